"""The DiffusionNFT objective against independent computations."""

import numpy as np
import pytest
import torch

from trl_nft.objective import (
    NOISE_LEVEL_BUCKETS,
    forward_process,
    group_advantages,
    kept_groups,
    nft_loss,
    noise_level_means,
    noise_level_sums,
    old_policy_decay,
    optimality_probability,
    soft_update_,
    velocity_norm_hinge,
    velocity_norm_ratio,
)


def _batch(seed=0, batch=4, shape=(3, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    noise = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    sigmas = torch.rand(batch, generator=g, dtype=torch.float64) * 0.9 + 0.05
    old = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    noisy, target = forward_process(clean, noise, sigmas)
    return clean, noise, sigmas, old, noisy, target


def test_forward_process_is_linear_interpolation():
    clean, noise, sigmas, _, noisy, target = _batch()
    t = sigmas.view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - t) * clean + t * noise)
    torch.testing.assert_close(target, noise - clean)


@pytest.mark.parametrize("beta", [1.0, 0.1, 0.5])
def test_velocity_loss_gradient_vanishes_at_per_sample_optimum(beta):
    clean, noise, sigmas, old, noisy, target = _batch()
    r = torch.tensor([0.0, 0.3, 0.5, 1.0], dtype=torch.float64)
    optimum = old + (2 * r - 1).view(-1, 1, 1, 1) * (target - old) / beta
    policy = optimum.clone().requires_grad_(True)
    loss = nft_loss(policy, old, noisy, clean, noise, sigmas, r, nft_beta=beta, loss_type="velocity").loss
    (grad,) = torch.autograd.grad(loss, policy)
    assert grad.abs().max() < 1e-12

    # Anywhere else the gradient does not vanish.
    policy = (optimum + 0.1).requires_grad_(True)
    loss = nft_loss(policy, old, noisy, clean, noise, sigmas, r, nft_beta=beta, loss_type="velocity").loss
    (grad,) = torch.autograd.grad(loss, policy)
    assert grad.abs().max() > 1e-7


def test_velocity_loss_matches_paper_formula():
    clean, noise, sigmas, old, noisy, target = _batch()
    policy = torch.randn_like(old)
    r, beta = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64), 0.7
    v_pos = (1 - beta) * old + beta * policy
    v_neg = (1 + beta) * old - beta * policy
    expected = np.mean(
        [
            r[i].item() * ((v_pos[i] - target[i]) ** 2).mean().item()
            + (1 - r[i].item()) * ((v_neg[i] - target[i]) ** 2).mean().item()
            for i in range(4)
        ]
    )
    loss = nft_loss(policy, old, noisy, clean, noise, sigmas, r, nft_beta=beta, loss_type="velocity")
    assert loss.loss.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("loss_type", ["velocity", "x0_adaptive"])
def test_without_the_negative_term_only_the_positive_policy_is_fitted(loss_type):
    clean, noise, sigmas, old, noisy, _ = _batch(seed=2)
    policy = torch.randn_like(old)
    r = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64)
    full = nft_loss(policy, old, noisy, clean, noise, sigmas, r, loss_type=loss_type)
    ablated = nft_loss(policy, old, noisy, clean, noise, sigmas, r, loss_type=loss_type, negative_loss=False)
    # The loss parts are the same; the ablated loss weighs only the positive one, by r.
    scale = 5.0 if loss_type == "x0_adaptive" else 1.0  # A_max / beta
    torch.testing.assert_close(ablated.positive, full.positive)
    expected = scale * (r * _per_sample_positive(policy, old, noisy, clean, noise, sigmas, loss_type)).mean()
    torch.testing.assert_close(ablated.loss, expected)


def _per_sample_positive(policy, old, noisy, clean, noise, sigmas, loss_type):
    """`L_pos` per sample (r = 1 and a batch of one, so that the mean is the sample's own)."""
    one = torch.ones(1, dtype=torch.float64)
    return torch.stack(
        [
            nft_loss(
                policy[i : i + 1],
                old[i : i + 1],
                noisy[i : i + 1],
                clean[i : i + 1],
                noise[i : i + 1],
                sigmas[i : i + 1],
                one,
                loss_type=loss_type,
                advantage_clip=1.0,
            ).loss
            for i in range(len(policy))
        ]
    )


def test_x0_adaptive_loss_matches_released_formula():
    # An independent numpy transcription of the released code's loss.
    clean, noise, sigmas, old, noisy, _ = _batch(seed=1)
    policy = torch.randn_like(old)
    r, beta, a_max = np.array([0.2, 0.5, 0.7, 1.0]), 0.3, 5.0
    x, xt, vo, vp, t = clean.numpy(), noisy.numpy(), old.numpy(), policy.numpy(), sigmas.numpy()[:, None, None, None]

    def branch(velocity):
        x0 = xt - t * velocity
        weight = np.maximum(np.abs(x0 - x).mean(axis=(1, 2, 3)), 1e-5)
        return ((x0 - x) ** 2).mean(axis=(1, 2, 3)) / weight

    positive = branch((1 - beta) * vo + beta * vp)
    negative = branch((1 + beta) * vo - beta * vp)
    expected = np.mean(a_max * (r * positive + (1 - r) * negative) / beta)
    loss = nft_loss(policy, old, noisy, clean, noise, sigmas, torch.from_numpy(r), nft_beta=beta, advantage_clip=a_max)
    assert loss.loss.item() == pytest.approx(expected, rel=1e-10)
    assert loss.positive.item() == pytest.approx(positive.mean(), rel=1e-10)
    assert loss.negative.item() == pytest.approx(negative.mean(), rel=1e-10)


@pytest.mark.parametrize("loss_type", ["velocity", "x0_adaptive"])
def test_r_one_pulls_toward_target_and_r_zero_pushes_away(loss_type):
    clean, noise, sigmas, old, noisy, target = _batch(seed=2)

    def distance_after_descent(r_value):
        policy = old.clone().requires_grad_(True)  # start at the old policy, as the soft update leaves it
        optimizer = torch.optim.Adam([policy], lr=0.05)
        r = torch.full((4,), r_value, dtype=torch.float64)
        for _ in range(30):
            optimizer.zero_grad()
            nft_loss(policy, old, noisy, clean, noise, sigmas, r, nft_beta=1.0, loss_type=loss_type).loss.backward()
            optimizer.step()
        return (policy.detach() - target).pow(2).mean().item()

    start = (old - target).pow(2).mean().item()
    assert distance_after_descent(1.0) < 0.8 * start
    assert distance_after_descent(0.0) > 1.2 * start


def test_kl_term_is_mean_squared_difference_to_reference():
    clean, noise, sigmas, old, noisy, _ = _batch()
    policy, reference = torch.randn_like(old), torch.randn_like(old)
    r = torch.full((4,), 0.5, dtype=torch.float64)
    without = nft_loss(policy, old, noisy, clean, noise, sigmas, r)
    with_kl = nft_loss(policy, old, noisy, clean, noise, sigmas, r, reference_velocity=reference, kl_coef=0.01)
    kl = ((policy - reference) ** 2).mean().item()
    assert with_kl.kl.item() == pytest.approx(kl)
    assert with_kl.loss.item() == pytest.approx(without.loss.item() + 0.01 * kl)
    with pytest.raises(ValueError, match="reference_velocity"):
        nft_loss(policy, old, noisy, clean, noise, sigmas, r, kl_coef=0.01)


def test_zero_variance_group_gives_one_half():
    rewards = torch.tensor([2.0, 2.0, 2.0, 2.0, 0.0, 1.0, 3.0, 4.0])
    for scale in ("batch", "group", "none"):
        r = optimality_probability(group_advantages(rewards, 4, scale))
        assert torch.all(r[:4] == 0.5)
        assert not torch.all(r[4:] == 0.5)


def test_batch_and_group_std_differ_as_they_should():
    rewards = np.array([0.0, 1.0, 2.0, 3.0, 10.0, 20.0, 30.0, 40.0])
    groups = rewards.reshape(2, 4)
    centered = groups - groups.mean(axis=1, keepdims=True)
    expected_batch = centered / (rewards.std() + 1e-4)
    expected_group = centered / (groups.std(axis=1, keepdims=True) + 1e-4)
    batch = group_advantages(torch.tensor(rewards), 4, "batch").numpy().reshape(2, 4)
    group = group_advantages(torch.tensor(rewards), 4, "group").numpy().reshape(2, 4)
    np.testing.assert_allclose(batch, expected_batch, rtol=1e-12)
    np.testing.assert_allclose(group, expected_group, rtol=1e-12)
    # Per-group scaling gives both groups the same advantages; the global std keeps the second group's larger spread.
    np.testing.assert_allclose(group[0], group[1], rtol=1e-3)  # equal up to the 1e-4 in Z + eps
    assert np.abs(batch[1]).max() == pytest.approx(10 * np.abs(batch[0]).max())
    np.testing.assert_allclose(group_advantages(torch.tensor(rewards), 4, "none").numpy().reshape(2, 4), centered)


def test_optimality_probability_clips_at_advantage_clip():
    advantages = torch.tensor([-10.0, -5.0, -2.5, 0.0, 2.5, 5.0, 10.0])
    r = optimality_probability(advantages, advantage_clip=5.0)
    torch.testing.assert_close(r, torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))


def test_group_advantages_rejects_partial_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(8), 4, "global-ish")


def test_old_policy_decay_schedules():
    assert [old_policy_decay(i) for i in (0, 1, 250, 500, 10_000)] == [0.0, 0.001, 0.25, 0.5, 0.5]
    assert old_policy_decay(7, "on_policy") == 0.0
    assert old_policy_decay(7, "constant", maximum=0.9) == 0.9
    ocr = dict(rate=0.0075, maximum=0.999, delay=75)
    assert old_policy_decay(74, **ocr) == 0.0
    assert old_policy_decay(75, **ocr) == 0.0
    assert old_policy_decay(175, **ocr) == pytest.approx(0.75)
    assert old_policy_decay(1000, **ocr) == 0.999
    with pytest.raises(ValueError, match="schedule"):
        old_policy_decay(1, "cosine")


def test_soft_update_is_an_ema():
    old, new = [torch.zeros(3), torch.ones(2)], [torch.ones(3), torch.zeros(2)]
    soft_update_(old, new, decay=0.75)
    torch.testing.assert_close(old[0], torch.full((3,), 0.25))
    torch.testing.assert_close(old[1], torch.full((2,), 0.75))
    soft_update_(old, new, decay=0.0)
    torch.testing.assert_close(old[0], new[0])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_vp_output_converts_to_the_flow_velocity(prediction_type):
    from trl_nft.objective import vp_flow_time, vp_output_to_flow_velocity

    clean, noise, _, _, _, _ = _batch(seed=3)
    alpha_bar = torch.tensor([0.99, 0.7, 0.3, 0.01], dtype=torch.float64)
    alphas, sigmas = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    a, s = alphas.view(-1, 1, 1, 1), sigmas.view(-1, 1, 1, 1)
    vp_noisy = a * clean + s * noise
    # The VP latent is the flow point at s = sigma / (alpha + sigma), scaled by alpha + sigma.
    flow_noisy, target = forward_process(clean, noise, vp_flow_time(alphas, sigmas))
    torch.testing.assert_close(vp_noisy, (a + s) * flow_noisy)
    # A perfect network output maps to the flow target velocity eps - x0.
    perfect = noise if prediction_type == "epsilon" else a * noise - s * clean
    velocity = vp_output_to_flow_velocity(perfect, vp_noisy, alphas, sigmas, prediction_type)
    torch.testing.assert_close(velocity, target)


@pytest.mark.parametrize("scale", ["batch", "group", "none"])
def test_unknown_rewards_are_left_out_of_the_group_statistics(scale):
    # A NaN reward (a sample the failure policy dropped) counts in no mean or std, and gets A = 0.
    known = torch.tensor([1.0, 3.0, 2.0, 6.0, 4.0], dtype=torch.float64)
    rewards = torch.tensor([1.0, float("nan"), 3.0, 2.0, 6.0, 4.0], dtype=torch.float64)
    advantages = group_advantages(rewards, num_generations=3, scale=scale)
    expected_known = torch.cat(
        [group_advantages(known[:2], 2, "none"), group_advantages(known[2:], 3, "none")]
    )  # centred on each group's known mean
    if scale == "batch":
        expected_known = expected_known / (known.std(unbiased=False) + 1e-4)
    elif scale == "group":
        stds = torch.tensor([known[:2].std(unbiased=False)] * 2 + [known[2:].std(unbiased=False)] * 3)
        expected_known = expected_known / (stds + 1e-4)
    assert advantages[1] == 0
    torch.testing.assert_close(advantages[[0, 2, 3, 4, 5]], expected_known)


def test_a_sample_of_weight_zero_trains_nothing():
    torch.manual_seed(0)
    policy = torch.randn(4, 2, 3, requires_grad=True)
    old, noisy, clean, noise = (torch.randn(4, 2, 3) for _ in range(4))
    sigmas, optimality = torch.rand(4), torch.rand(4)
    weights = torch.tensor([1.0, 0.0, 1.0, 1.0])
    loss = nft_loss(policy, old, noisy, clean, noise, sigmas, optimality, sample_weights=weights).loss
    loss.backward()
    assert torch.all(policy.grad[1] == 0) and torch.all(policy.grad[[0, 2, 3]] != 0)
    kept = [0, 2, 3]
    others = nft_loss(policy[kept], old[kept], noisy[kept], clean[kept], noise[kept], sigmas[kept], optimality[kept])
    torch.testing.assert_close(loss, others.loss * 3 / 4)  # a zero term inside the batch mean
    unweighted = nft_loss(policy, old, noisy, clean, noise, sigmas, optimality).loss
    assert torch.equal(
        nft_loss(policy, old, noisy, clean, noise, sigmas, optimality, sample_weights=torch.ones(4)).loss, unweighted
    )


def test_the_group_filter_drops_exactly_the_flat_and_the_solved_groups():
    rewards = torch.tensor(
        [
            [0.0, 1.0, 0.0, 1.0],  # std 0.5, mean 0.5: kept
            [0.50, 0.52, 0.48, 0.50],  # std 0.014 < 0.05: flat
            [0.8, 1.0, 1.0, 0.95],  # std 0.082, mean 0.9375 > 0.9: solved
            [0.0, 0.2, float("nan"), 0.1],  # std 0.082 over the known three, mean 0.1: kept
            [float("nan")] * 4,  # nothing known: kept (its samples train nothing anyway)
        ]
    ).view(-1)
    assert kept_groups(rewards, 4, min_std=0.05, max_mean=0.9).tolist() == [True, False, False, True, True]
    assert kept_groups(rewards, 4, min_std=0.05).tolist() == [True, False, True, True, True]
    assert kept_groups(rewards, 4, max_mean=0.9).tolist() == [True, True, False, True, True]
    assert kept_groups(rewards, 4).all()


def test_the_velocity_norm_ratio_equals_a_direct_computation():
    """Per sample, the ratio of the L2 norms over the latent elements, against the reference when there is one, else
    the old policy; and its means by noise-level bucket (low t < 1/3 <= mid < 2/3 <= high) over a fixed batch."""
    clean, noise, sigmas, old, noisy, _ = _batch(seed=3, batch=6)
    sigmas = torch.tensor([0.1, 0.2, 0.5, 0.7, 0.9, 1.0], dtype=torch.float64)
    policy, reference = 1.1 * old + 0.1 * torch.randn_like(old), torch.randn_like(old)
    r = torch.full((6,), 0.5, dtype=torch.float64)

    def direct(anchor):
        return np.array([np.linalg.norm(policy[i].numpy()) / np.linalg.norm(anchor[i].numpy()) for i in range(6)])

    to_old = nft_loss(policy, old, noisy, clean, noise, sigmas, r).velocity_norm_ratio
    to_reference = nft_loss(
        policy, old, noisy, clean, noise, sigmas, r, reference_velocity=reference, kl_coef=1e-4
    ).velocity_norm_ratio
    np.testing.assert_allclose(to_old.numpy(), direct(old), rtol=1e-12)
    np.testing.assert_allclose(to_reference.numpy(), direct(reference), rtol=1e-12)
    np.testing.assert_allclose(velocity_norm_ratio(policy, old).numpy(), direct(old), rtol=1e-12)

    ratios = direct(old)
    means = noise_level_means(noise_level_sums(to_old, sigmas).tolist())
    assert list(NOISE_LEVEL_BUCKETS) == ["low_noise", "mid_noise", "high_noise"]
    expected = {
        None: ratios.mean(),
        "low_noise": ratios[:2].mean(),
        "mid_noise": ratios[2],
        "high_noise": ratios[3:].mean(),
    }
    assert means == pytest.approx(expected, rel=1e-12)
    # Sums add up over times (and processes) before the division; an empty bucket is left out.
    later = noise_level_sums(to_old[:2], sigmas[:2])
    added = noise_level_means((noise_level_sums(to_old, sigmas) + later).tolist())
    assert added["low_noise"] == pytest.approx(ratios[:2].mean()) and added["mid_noise"] == pytest.approx(ratios[2])
    assert set(noise_level_means(later.tolist())) == {None, "low_noise"}


def test_the_velocity_norm_penalty_acts_only_above_the_anchors_norm_and_pushes_the_norm_down():
    """`w * mean_b relu(||v_theta|| - (1 + m) ||v_a||)^2`, norms as RMS over a sample's elements: zero (no gradient)
    while the policy's norm is within (1 + m) of the anchor's, and above it a gradient step lowers the norm."""
    clean, noise, sigmas, old, noisy, _ = _batch(seed=4)
    r = torch.full((4,), 0.5, dtype=torch.float64)
    direction = torch.randn_like(old)
    scales = torch.tensor([0.9, 1.05, 1.2, 1.5], dtype=torch.float64).view(-1, 1, 1, 1)
    policy = (scales * direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).requires_grad_(True)
    anchor = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # unit L2 norms: ratios are the scales

    hinge = velocity_norm_hinge(policy, anchor, margin=0.1)
    size = anchor[0].numel()
    expected = [0.0, 0.0, (0.2 - 0.1) ** 2 / size, (0.5 - 0.1) ** 2 / size]  # RMS = L2 / sqrt(size)
    np.testing.assert_allclose(hinge.detach().numpy(), expected, rtol=1e-10, atol=1e-30)
    assert velocity_norm_hinge(policy, anchor)[1].item() == pytest.approx(0.05**2 / size)  # no margin: 1.05 counts

    (grad,) = torch.autograd.grad(hinge.sum(), policy)
    assert torch.all(grad[:2] == 0)  # within the margin: nothing moves
    flat_grad, flat_policy = grad[2:].flatten(1), policy[2:].detach().flatten(1)
    cosine = torch.nn.functional.cosine_similarity(flat_grad, flat_policy, dim=1)
    torch.testing.assert_close(cosine, torch.ones(2, dtype=torch.float64))  # along v_theta: descent shrinks it
    stepped = policy.detach() - 1e-2 * grad / grad.flatten(1).norm(dim=1).clamp(min=1e-30).view(-1, 1, 1, 1)
    assert torch.all(stepped[2:].flatten(1).norm(dim=1) < policy[2:].detach().flatten(1).norm(dim=1))

    # In the NFT loss: against the old policy without a reference, against the reference with one.
    weight = 3.0
    without = nft_loss(policy, anchor, noisy, clean, noise, sigmas, r)
    penalised = nft_loss(
        policy, anchor, noisy, clean, noise, sigmas, r, velocity_norm_penalty=weight, velocity_norm_margin=0.1
    )
    assert penalised.velocity_norm.item() == pytest.approx(np.mean(expected))
    assert penalised.loss.item() == pytest.approx(without.loss.item() + weight * np.mean(expected))
    against_reference = nft_loss(
        policy,
        old,
        noisy,
        clean,
        noise,
        sigmas,
        r,
        reference_velocity=anchor,
        kl_coef=1e-4,
        velocity_norm_penalty=weight,
        velocity_norm_margin=0.1,
    )
    assert against_reference.velocity_norm.item() == pytest.approx(np.mean(expected))
