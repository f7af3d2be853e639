r"""The DiffusionNFT objective, as pure tensor functions.

Notation (rectified flow): `x_t = (1 - t) x_0 + t eps`, `t` in [0, 1] (`t = 0` clean), target velocity `v = eps - x_0`,
`v_theta` the trained policy, `v_old` the sampling ("old") policy, `v_ref` the frozen base model. One iteration
collects `K` images per prompt with the old policy, scores them, turns the rewards into optimality probabilities `r`,
and trains on the forward process with the implicit positive and negative policies (`beta` = `nft_beta`, the NFT strength)

    v_pos = (1 - beta) v_old + beta v_theta
    v_neg = (1 + beta) v_old - beta v_theta

whose per-sample optimum is `v_theta = v_old + (2r - 1) (v - v_old) / beta`. The trainer calls these functions and
re-derives none of the mathematics.
"""

from dataclasses import dataclass

import torch


REWARD_SCALES = ("batch", "group", "none")
LOSS_TYPES = ("x0_adaptive", "velocity")
DECAY_SCHEDULES = ("linear", "constant", "on_policy")
#: The noise-level buckets of the velocity-norm instruments: `[low, high)` ranges of the time `t` (the last holds 1).
NOISE_LEVEL_BUCKETS = {"low_noise": (0.0, 1 / 3), "mid_noise": (1 / 3, 2 / 3), "high_noise": (2 / 3, 1.0)}


def forward_process(
    clean: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Noise clean latents to time `t`: returns `x_t = (1 - t) x_0 + t eps` and the target velocity `v = eps - x_0`.

    `sigmas` holds one `t` per sample (shape `[B]`).
    """
    t = _per_sample(sigmas, clean)
    return (1 - t) * clean + t * noise, noise - clean


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale: str = "batch", eps: float = 1e-4
) -> torch.Tensor:
    r"""Advantages `A = (R - mean_group(R)) / (Z + eps)` for rewards laid out as consecutive groups of `num_generations`.

    `scale` picks `Z`: `"batch"`, the std of all rewards passed in (the released code's global std over the whole
    iteration, gathered across processes); `"group"`, each group's own std; `"none"`, `Z = 1`. Stds are population
    stds (no Bessel correction). A group whose rewards are all equal gets `A = 0`.

    A NaN reward marks a sample whose reward is unknown (dropped by the reward failure policy): it is left out of its
    group's mean and of the stds, and gets `A = 0`.
    """
    if scale not in REWARD_SCALES:
        raise ValueError(f"scale must be one of {REWARD_SCALES}, got {scale!r}.")
    if rewards.ndim != 1 or rewards.numel() % num_generations != 0:
        raise ValueError(
            f"expected a flat tensor of groups of {num_generations} rewards, got shape {tuple(rewards.shape)}."
        )
    grouped = rewards.view(-1, num_generations)
    if rewards.isnan().any():
        return _group_advantages_of_known(grouped, scale, eps).view(-1)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "batch":
        centered = centered / (rewards.std(unbiased=False) + eps)
    elif scale == "group":
        centered = centered / (grouped.std(dim=1, unbiased=False, keepdim=True) + eps)
    return centered.view(-1)


def group_reward_std(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """The population std of each group of `num_generations` consecutive rewards, over its known (non-NaN) ones."""
    grouped = rewards.view(-1, num_generations)
    centered = grouped - grouped.nanmean(dim=1, keepdim=True)
    return (centered**2).nanmean(dim=1).sqrt()


def kept_groups(
    rewards: torch.Tensor, num_generations: int, min_std: float | None = None, max_mean: float | None = None
) -> torch.Tensor:
    r"""Which groups of `num_generations` consecutive rewards train (bool, one per group): a group is filtered out
    when `std(R_group) < min_std` (its ranking is mostly noise) or `mean(R_group) > max_mean` (already solved), as
    Edit-R1 filters its groups (std < 0.05 or mean > 0.9 on a [0, 1] score). `None` disables a bound. Population stds
    and means over the known (non-NaN) rewards; a group with none known is kept (its samples carry weight 0 anyway)."""
    grouped = rewards.view(-1, num_generations)
    mean, std = grouped.nanmean(dim=1), group_reward_std(rewards, num_generations)
    kept = torch.ones(len(grouped), dtype=torch.bool, device=rewards.device)
    if min_std is not None:
        kept &= ~(std < min_std)  # a NaN std (nothing known) compares False: kept
    if max_mean is not None:
        kept &= ~(mean > max_mean)
    return kept


def _group_advantages_of_known(grouped: torch.Tensor, scale: str, eps: float) -> torch.Tensor:
    """`group_advantages` over the known (non-NaN) rewards of `grouped`; 0 for the unknown ones."""
    centered = grouped - grouped.nanmean(dim=1, keepdim=True)  # a group with no known reward stays NaN: A = 0
    if scale == "batch":
        centered = centered / (grouped[~grouped.isnan()].std(unbiased=False) + eps)
    elif scale == "group":
        centered = centered / ((centered**2).nanmean(dim=1, keepdim=True).sqrt() + eps)
    return centered.nan_to_num(nan=0.0)


def optimality_probability(advantages: torch.Tensor, advantage_clip: float = 5.0) -> torch.Tensor:
    r"""The optimality probability `r = 0.5 + 0.5 clip(A / A_max, -1, 1)` in [0, 1], with `A_max = advantage_clip`.

    `r = 1` makes a sample fully "positive", `r = 0` fully "negative", `r = 0.5` only pulls toward the old policy.
    """
    return 0.5 + 0.5 * (advantages / advantage_clip).clamp(-1.0, 1.0)


@dataclass
class NFTLoss:
    """The scalar loss to back-propagate, its parts (batch means, detached) and each sample's velocity-norm ratio to
    the anchor policy (detached) for logging."""

    loss: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    kl: torch.Tensor
    velocity_norm: torch.Tensor
    velocity_norm_ratio: torch.Tensor


def nft_loss(
    policy_velocity: torch.Tensor,
    old_velocity: torch.Tensor,
    noisy: torch.Tensor,
    clean: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    optimality: torch.Tensor,
    nft_beta: float = 1.0,
    loss_type: str = "x0_adaptive",
    advantage_clip: float = 5.0,
    reference_velocity: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    negative_loss: bool = True,
    sample_weights: torch.Tensor | None = None,
    velocity_norm_penalty: float = 0.0,
    velocity_norm_margin: float = 0.0,
) -> NFTLoss:
    r"""The DiffusionNFT loss on one batch of forward-process samples `x_t` at times `sigmas`.

    With `v_pos`, `v_neg` the implicit policies (module docstring, `beta` = `nft_beta`) and `r` = `optimality`:

    `loss_type="velocity"` (the paper's loss):
        `L = mean_b[ r ||v_pos - v||^2 + (1 - r) ||v_neg - v||^2 ]`   (squared norms as means over elements)

    `loss_type="x0_adaptive"` (the released code's, a stabilising reparametrisation): with `x0_s = x_t - t v_s`,
        `L_s = mean((x0_s - x_0)^2) / sg(max(mean(|x0_s - x_0|), 1e-5))`   (per sample, the weight in float64)
        `L = mean_b[ A_max (r L_pos + (1 - r) L_neg) / beta ]`

    `negative_loss=False` drops the `(1 - r)` term (the paper's ablation: only the positive policy is fitted, and the
    reward collapses). `sample_weights` (one per sample, default 1) multiply each sample's policy term inside
    `mean_b`: a weight 0 drops a sample whose reward is unknown. Either way a reference penalty is added when
    `kl_coef > 0`: `L += kl_coef * mean_b mean((v_theta - v_ref)^2)`, and a velocity-norm penalty (NormGuard) when
    `velocity_norm_penalty` = `w > 0`: `L += w * mean_b velocity_norm_hinge(v_theta, v_a, velocity_norm_margin)`, with
    the anchor `v_a = v_ref` when `reference_velocity` is given, else `v_old`.
    `old_velocity` and `reference_velocity` are treated as constants. Returns the loss and its detached parts
    (`positive` = `mean_b L_pos`, `negative` = `mean_b L_neg`, `kl`, `velocity_norm` = the hinge's `mean_b`, computed
    whatever `w`) and each sample's `velocity_norm_ratio(v_theta, v_a)`.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}.")
    old_velocity = old_velocity.detach()
    positive_velocity = (1 - nft_beta) * old_velocity + nft_beta * policy_velocity
    negative_velocity = (1 + nft_beta) * old_velocity - nft_beta * policy_velocity
    r = optimality.to(policy_velocity.dtype)
    negative_weight = (1 - r) if negative_loss else torch.zeros_like(r)
    weight = torch.ones_like(r) if sample_weights is None else sample_weights.to(r.dtype)

    if loss_type == "velocity":
        target = noise - clean
        positive = _mean_per_sample((positive_velocity - target) ** 2)
        negative = _mean_per_sample((negative_velocity - target) ** 2)
        policy_loss = (weight * (r * positive + negative_weight * negative)).mean()
    else:
        t = _per_sample(sigmas, noisy)
        positive = _adaptive_x0_loss(noisy - t * positive_velocity, clean)
        negative = _adaptive_x0_loss(noisy - t * negative_velocity, clean)
        policy_loss = (weight * advantage_clip * (r * positive + negative_weight * negative) / nft_beta).mean()

    kl = policy_loss.new_zeros(())
    if kl_coef > 0:
        if reference_velocity is None:
            raise ValueError("kl_coef > 0 needs reference_velocity.")
        kl = _mean_per_sample((policy_velocity - reference_velocity.detach()) ** 2).mean()
    anchor = (old_velocity if reference_velocity is None else reference_velocity).detach()
    velocity_norm = velocity_norm_hinge(policy_velocity, anchor, velocity_norm_margin).mean()
    loss = policy_loss + kl_coef * kl
    if velocity_norm_penalty > 0:  # off, the loss and its gradient are exactly those without the hinge
        loss = loss + velocity_norm_penalty * velocity_norm
    return NFTLoss(
        loss=loss,
        positive=positive.mean().detach(),
        negative=negative.mean().detach(),
        kl=kl.detach(),
        velocity_norm=velocity_norm.detach(),
        velocity_norm_ratio=velocity_norm_ratio(policy_velocity, anchor),
    )


def velocity_norms(velocity: torch.Tensor) -> torch.Tensor:
    r"""Each sample's velocity norm `||v|| = sqrt(mean(v^2))` over its latent elements: the L2 norm divided by the
    square root of their count, so that a penalty on it weighs the same at any resolution (ratios of these norms are
    ratios of L2 norms)."""
    flat = velocity.flatten(1)
    return torch.linalg.vector_norm(flat, dim=1) / flat.shape[1] ** 0.5


@torch.no_grad()
def velocity_norm_ratio(policy_velocity: torch.Tensor, anchor_velocity: torch.Tensor) -> torch.Tensor:
    r"""Each sample's `||v_theta|| / ||v_a||`, the ratio of its per-sample L2 norms over the latent elements, against
    an anchor `v_a` (the reference, or the old policy): NFT, like AWM and DPO, raises the policy's per-step velocity
    norm 5-15% over the reference's (NormGuard), so a ratio drifting above 1 is that inflation."""
    return velocity_norms(policy_velocity) / velocity_norms(anchor_velocity)


def velocity_norm_hinge(
    policy_velocity: torch.Tensor, anchor_velocity: torch.Tensor, margin: float = 0.0
) -> torch.Tensor:
    r"""NormGuard's hinge, per sample: `relu(||v_theta|| - (1 + m) ||v_a||)^2` with the norms of `velocity_norms` and
    the margin `m` = `margin`. Zero (and so without gradient) while the policy's norm stays within `(1 + m)` times the
    anchor's; above it, its gradient `2 relu(...) v_theta / (D ||v_theta||)` (`D` latent elements) shrinks `||v_theta||`
    along its own direction. `anchor_velocity` is a constant."""
    excess = velocity_norms(policy_velocity) - (1 + margin) * velocity_norms(anchor_velocity.detach())
    return excess.clamp(min=0) ** 2


def noise_level_sums(values: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    r"""`[sum, count]` of the per-sample `values` over all samples, then over those whose time `t` (`sigmas`) lies in
    each of `NOISE_LEVEL_BUCKETS`, flat (`2 (1 + buckets)` numbers): sums, so that they add up over training times,
    micro-steps and processes before `noise_level_means` divides. No host sync (no boolean indexing)."""
    t = sigmas.to(values.device, values.dtype)
    masks = [torch.ones_like(t)]
    for low, high in NOISE_LEVEL_BUCKETS.values():
        masks.append(((t >= low) & ((t < high) | (high == 1.0))).to(t.dtype))  # the last bucket holds t = 1
    masks = torch.stack(masks)
    return torch.stack([masks @ values, masks.sum(dim=1)], dim=1).flatten()


def noise_level_means(sums: list[float]) -> dict[str | None, float]:
    r"""The means of `noise_level_sums` (added up): `None` for all samples, then each bucket's name; a bucket without
    samples is left out."""
    names = [None, *NOISE_LEVEL_BUCKETS]
    return {name: total / count for name, total, count in zip(names, sums[::2], sums[1::2], strict=True) if count}


def old_policy_decay(
    step: int, schedule: str = "linear", rate: float = 0.001, maximum: float = 0.5, delay: int = 0
) -> float:
    r"""The decay `eta_i` of the old-policy update `theta_old <- eta_i theta_old + (1 - eta_i) theta` after step `i`.

    `"linear"`: `eta_i = 0` for `i < delay`, then `min(rate (i - delay), maximum)`. The paper's default is
    `rate=0.001, maximum=0.5, delay=0`; the released OCR run uses `rate=0.0075, maximum=0.999, delay=75`.
    `"constant"`: `eta_i = maximum`. `"on_policy"`: `eta_i = 0` (the old policy is the current one).
    """
    if schedule == "on_policy":
        return 0.0
    if schedule == "constant":
        return maximum
    if schedule == "linear":
        return min(rate * max(step - delay, 0), maximum)
    raise ValueError(f"schedule must be one of {DECAY_SCHEDULES}, got {schedule!r}.")


def ema_decay(step: int, maximum: float) -> float:
    r"""The decay `d_i` of the evaluation EMA `theta_ema <- d_i theta_ema + (1 - d_i) theta` after optimizer step
    `i >= 1`: `d_i = min(i / (9 + i), maximum)`, the released code's warm-up `min((1 + s) / (10 + s), decay)` at its
    0-based step `s = i - 1` (the EMA follows the early weights closely), with `maximum = 0.9` there."""
    return min(step / (9 + step), maximum)


@torch.no_grad()
def soft_update_(old: list[torch.Tensor], new: list[torch.Tensor], decay: float) -> None:
    r"""In place, `old <- decay * old + (1 - decay) * new` for each pair of tensors."""
    for old_tensor, new_tensor in zip(old, new, strict=True):
        old_tensor.lerp_(new_tensor.to(old_tensor.dtype), 1.0 - decay)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def _mean_per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.mean(dim=tuple(range(1, values.ndim)))


def _adaptive_x0_loss(prediction: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        weight = _mean_per_sample((prediction.double() - clean.double()).abs()).clamp(min=1e-5)
    return (_mean_per_sample((prediction - clean) ** 2) / weight).to(prediction.dtype)


def vp_flow_time(alphas: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    r"""The flow time of a VP noise level: `x_t = alpha x_0 + sigma eps` is `(alpha + sigma) x_s` with
    `x_s = (1 - s) x_0 + s eps` and `s = sigma / (alpha + sigma)`. VP models (SD1.x, SDXL) train on the flow
    objective at these times."""
    return sigmas / (alphas + sigmas)


def vp_output_to_flow_velocity(
    output: torch.Tensor, vp_noisy: torch.Tensor, alphas: torch.Tensor, sigmas: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    r"""Flow velocity `v = eps_hat - x0_hat` of a VP model's output at `x_t = alpha x_0 + sigma eps`.

    `"epsilon"`: `eps_hat = output`, `x0_hat = (x_t - sigma eps_hat) / alpha`. `"v_prediction"`: `x0_hat = alpha x_t -
    sigma output`, `eps_hat = sigma x_t + alpha output` (with `alpha^2 + sigma^2 = 1`). Both are affine in the network
    output, so the NFT policy mixing `v_old +- beta (v_theta - v_old)` holds for the network output exactly.
    """
    alpha, sigma = _per_sample(alphas, output), _per_sample(sigmas, output)
    if prediction_type == "epsilon":
        epsilon = output
        clean = (vp_noisy - sigma * output) / alpha
    elif prediction_type == "v_prediction":
        epsilon = sigma * vp_noisy + alpha * output
        clean = alpha * vp_noisy - sigma * output
    else:
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}.")
    return epsilon - clean
