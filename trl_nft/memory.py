"""The predicted peak GPU memory of a DiffusionNFT run (`trl-nft estimate-memory`, docs/memory.md), from the real model
configs instantiated on the meta device: nothing is downloaded or allocated.

Terms (bytes, per process):

- **frozen weights**, per component and dtype: every parameter and buffer in the weights' dtype; a quantized
  component's linear weights at the backend's storage (`QUANTIZED_LINEAR_BYTES`; GGUF: the file's own types);
- **LoRA and optimizer**: the trained and the old adapter (and the evaluation EMA) in float32, the trained one's
  gradients (within the training activations) and the optimizer's state (AdamW: two float32 moments; the bitsandbytes 8-bit optimizers: two bytes per
  weight and a float32 scale per 256, 32-bit moments for tensors under 4096 values);
- **activations**, measured by running the denoiser, with its LoRA, on meta tensors at the run's size (a forward
  without gradients; a forward and a backward, with and without diffusers' activation checkpointing) and following the
  bytes of the tensors alive at each moment to their peak (`_LiveTensors`). Attention is counted as the fused kernels
  allocate it (`_FusedAttentionShapes`): the meta device's own fallback would build the attention matrix. What the meta
  device cannot show is added: a torchao or GGUF layer dequantizes its weight in the forward, so each frozen weight
  the backward reads is a saved copy in the compute dtype (one block's at a time with checkpointing; bitsandbytes
  keeps the quantized one), and under mixed precision PEFT casts each LoRA layer's input to float32 and autocast back
  (one more copy). Not modelled: autocast's float32 norms, the VAE decode, the allocator (`benchmarks/memory_gpu.py`
  measures them on a GPU). A training micro-step's peak is the larger of the frozen policies' forward (old and
  reference in one doubled batch) and the policy's forward and backward.

The peak is the larger of the rollout phase (every weight resident, the rollout's activations) and the training
phase (the text encoders and VAE out with `offload_text_encoders_and_vae`, the LoRA state, the training
activations).
"""

import contextlib
import importlib.resources as resources
import inspect
import json
import math
import os
import warnings
import weakref
from collections import defaultdict
from dataclasses import dataclass, replace

import diffusers
import torch
import transformers
from accelerate import init_empty_weights
from diffusers import DiffusionPipeline
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .forwards import repeated_blocks


GIB = 1024**3
#: Bytes per value of a frozen linear weight `[rows, columns]` stored by each quantization method, as
#: `(bytes per weight, bytes per row)`: torchao keeps int8 (or float8) values with a float32 scale (and int8 zero
#: point) per row; bitsandbytes NF4 packs two weights a byte with a float32 absmax per 64, its int8 a float32 scale
#: per row. GGUF's come from its block sizes (`gguf.GGML_QUANT_SIZES`).
QUANTIZED_LINEAR_BYTES = {
    "int8-weight-only": (1.0, 5),
    "int8-dynamic": (1.0, 5),
    "fp8-weight-only": (1.0, 4),
    "nf4": (0.5 + 4 / 64, 0),
    "int8": (1.0, 4),
}
#: Quantization methods whose layers dequantize their weight in an autograd-visible forward (so the backward keeps a
#: copy); bitsandbytes' matmul keeps the quantized weight.
DEQUANTIZING_METHODS = ("int8-weight-only", "int8-dynamic", "fp8-weight-only", "gguf")
_GGUF_DEFAULT_TYPE = "Q8_0"
_DEFAULT_RESOLUTION = 1024  # of a model read from a folder or the Hub: its pipeline fixes it in code
_BITSANDBYTES_8BIT_OPTIMIZERS = ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "lion_8bit", "paged_lion_8bit")


# ---------------------------------------------------------------------------------------------- measured bytes


def stored_bytes(tensor: torch.Tensor) -> int:
    """The bytes `tensor`'s own storage holds: a quantized tensor (torchao's subclasses) those of its inner tensors
    (values, scales, zero points), a GGUF parameter its packed blocks."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def module_bytes(module: nn.Module, frozen_only: bool = True) -> int:
    """The stored bytes of `module`'s parameters and buffers (each counted once); with `frozen_only`, without the
    LoRA adapters' weights."""
    tensors = dict(module.named_parameters(remove_duplicate=True))
    tensors.update(module.named_buffers(remove_duplicate=True))
    return sum(stored_bytes(t) for name, t in tensors.items() if not (frozen_only and ".lora_" in name))


# ---------------------------------------------------------------------------------------------- model configs


@dataclass
class Component:
    """One `nn.Module` component of a pipeline: its library (`diffusers` or `transformers`), class and config."""

    library: str
    class_name: str
    config: dict

    def instantiate(self) -> nn.Module:
        """The component on the meta device: no memory, no weights."""
        with init_empty_weights(include_buffers=True):
            if self.library == "diffusers":
                return getattr(diffusers, self.class_name).from_config(self.config)
            model_class = getattr(transformers, self.class_name)
            return model_class._from_config(model_class.config_class.from_dict(self.config))


@dataclass
class ModelConfigs:
    """A pipeline's class and the configs of its `nn.Module` components."""

    pipeline_class: str
    components: dict[str, Component]
    resolution: int  # the native image side in pixels, for a run that sets none
    num_frames: int | None = None  # a video model's frames, for a run that sets none (None: the pipeline's default)


def shipped_configs() -> dict[str, str]:
    """The shipped model configs (`trl_nft/model_configs/*.json`): file name by model alias and Hub id."""
    files = {}
    for entry in resources.files("trl_nft").joinpath("model_configs").iterdir():
        if entry.name.endswith(".json"):
            data = json.loads(entry.read_text())
            files[entry.name[: -len(".json")]] = files[data["hub_id"]] = entry.name
    return files


def model_configs(model: str | DiffusionPipeline) -> ModelConfigs:
    """The component configs of `model`: a pipeline instance, an embedded name (its tiny pipeline is built), a model
    alias or Hub id whose configs ship with the package (offline), a local folder, or another Hub id (its config files
    only are fetched)."""
    from .embedded import EMBEDDED_MODELS

    if isinstance(model, str) and model in EMBEDDED_MODELS:
        model = EMBEDDED_MODELS[model]()
    if isinstance(model, DiffusionPipeline):
        components = {}
        for name, module in model.components.items():
            if isinstance(module, diffusers.ModelMixin):
                components[name] = Component("diffusers", type(module).__name__, dict(module.config))
            elif isinstance(module, transformers.PreTrainedModel):
                components[name] = Component("transformers", type(module).__name__, module.config.to_dict())
        from .models import get_adapter

        adapter = get_adapter(model)
        frames = adapter.num_frames if adapter.produces_videos else None
        return ModelConfigs(type(model).__name__, components, adapter.default_resolution(), frames)
    shipped = shipped_configs()
    if model in shipped:
        data = json.loads(resources.files("trl_nft").joinpath("model_configs", shipped[model]).read_text())
        components = {name: Component(**entry) for name, entry in data["components"].items()}
        return ModelConfigs(data["pipeline_class"], components, data["resolution"])
    from .models import resolve_model_name

    path = resolve_model_name(model)
    try:
        with warnings.catch_warnings():  # diffusers passes huggingface_hub a deprecated argument
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            index = DiffusionPipeline.load_config(path)
    except OSError as error:  # offline, gated, or not a pipeline
        aliases = sorted(name for name in shipped if "/" not in name)
        reason = str(error).strip().splitlines()[0]
        raise ValueError(
            f"{model}: its component configs do not ship with trl-nft (they do for {', '.join(aliases)}) and could "
            f"not be read ({reason}). Run once with access to the Hub (only the config files, a few kB, are read), "
            "or give a local pipeline folder."
        ) from error
    components = {}
    for name, value in index.items():
        if (
            name.startswith("_")
            or not isinstance(value, list | tuple)
            or value[0] not in ("diffusers", "transformers")
        ):
            continue
        model_class = getattr(diffusers if value[0] == "diffusers" else transformers, value[1], None)
        if not (
            isinstance(model_class, type)
            and issubclass(model_class, diffusers.ModelMixin | transformers.PreTrainedModel)
        ):
            continue  # tokenizers, schedulers, processors
        if value[0] == "diffusers":
            config = dict(model_class.load_config(path, subfolder=name))
        else:
            config = model_class.config_class.from_pretrained(path, subfolder=name).to_dict()
        components[name] = Component(value[0], value[1], config)
    return ModelConfigs(index["_class_name"], components, _DEFAULT_RESOLUTION)


# ---------------------------------------------------------------------------------------------- weights


def weight_bytes(
    module: nn.Module, dtype: torch.dtype, quantization: str | None = None, gguf_types: dict[str, str] | None = None
) -> int:
    """The bytes of `module`'s weights (and buffers) in `dtype`, its linear weights quantized by `quantization` (as
    `trl_nft.quantization` loads them); `gguf_types` gives a GGUF file's type per weight name (else Q8_0 wherever a
    row divides into its blocks). A transformers model keeps unconverted what transformers leaves so; the VAE and other components are never quantized."""
    import gguf

    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    quantized = {}
    if quantization is not None:
        kept = None  # transformers' own choice of what it leaves unconverted (output embeddings, last layer, ...)
        if isinstance(module, transformers.PreTrainedModel):
            from transformers.quantizers.base import HfQuantizer
            from transformers.quantizers.quantizers_utils import should_convert_module

            kept = HfQuantizer.get_modules_to_not_convert(module, None, module._keep_in_fp32_modules)
        quantized = {
            f"{name}.weight": sub
            for name, sub in module.named_modules()
            if isinstance(sub, nn.Linear) and (kept is None or should_convert_module(f"{name}.weight", kept))
        }
    total = 0
    tensors = dict(module.named_parameters(remove_duplicate=True))
    # transformers computes its buffers (rotary frequencies) in float32 and keeps them so; diffusers casts them.
    buffers = dict(module.named_buffers(remove_duplicate=True))
    tensors.update(buffers)
    for name, tensor in tensors.items():
        if ".lora_" in name:  # the adapters are counted apart
            continue
        own_dtype = not tensor.is_floating_point() or (
            name in buffers and isinstance(module, transformers.PreTrainedModel)
        )
        plain = tensor.numel() * (tensor.element_size() if own_dtype else dtype_bytes)
        if name not in quantized:
            total += plain
        elif quantization == "gguf":
            type_name = (gguf_types or {}).get(name.replace(".base_layer", ""), _GGUF_DEFAULT_TYPE)  # under a LoRA
            block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
            total += plain if tensor.shape[-1] % block else tensor.numel() // block * block_bytes
        else:
            per_weight, per_row = QUANTIZED_LINEAR_BYTES[quantization]
            total += math.ceil(tensor.numel() * per_weight) + tensor.shape[0] * per_row
    return total


def gguf_tensor_types(path: str) -> dict[str, str]:
    """The type of each tensor of a GGUF file (read from its header; a GGUF file in the original format has other
    names than diffusers', then the default type applies)."""
    import gguf

    return {tensor.name: tensor.tensor_type.name for tensor in gguf.GGUFReader(path).tensors}


def lora_parameters(denoiser: nn.Module, lora_config: LoraConfig) -> list[torch.Tensor]:
    """The weights of one LoRA adapter with `lora_config` on `denoiser` (a meta module: nothing is allocated), as
    PEFT creates them."""
    with init_empty_weights():
        denoiser.add_adapter(lora_config)
    return [param for name, param in denoiser.named_parameters() if ".lora_" in name]


def optimizer_state_bytes(parameters: list[torch.Tensor], optim) -> int:
    """The optimizer state of `parameters` (float32 LoRA weights): AdamW's two float32 moments, or the bitsandbytes
    8-bit optimizers' two bytes per weight plus a float32 scale per block of 256 (tensors under 4096 values keep
    32-bit moments, bitsandbytes' `min_8bit_size`)."""
    optim, total = str(getattr(optim, "value", optim)), 0
    for param in parameters:
        if optim in _BITSANDBYTES_8BIT_OPTIMIZERS and param.numel() >= 4096:
            total += 2 * (param.numel() + 4 * math.ceil(param.numel() / 256))
        else:
            total += 2 * 4 * param.numel()
    return total


# ---------------------------------------------------------------------------------------------- activations


@dataclass
class ActivationProbe:
    """What one forward (and backward) of the denoiser on the meta device allocates (bytes)."""

    peak: int = 0  # live tensors at the highest point, over the forward (and backward)
    frozen_weights_read: int = 0  # frozen weights the backward reads (each a dequantized copy on torchao or GGUF)
    largest_block_weights_read: int = 0
    lora_inputs: int = 0  # the LoRA layers' inputs, which mixed precision copies (PEFT's cast to float32 and back)
    largest_block_lora_inputs: int = 0

    def training(self, checkpointing: bool, dequantizing: bool, mixed_precision: bool) -> int:
        """Activations (and LoRA gradients) of one training forward and backward: the peak, plus what the meta device
        does not allocate: the dequantized weight copies and the mixed-precision copies of the LoRA inputs (of one
        block at a time with checkpointing)."""
        weights = self.largest_block_weights_read if checkpointing else self.frozen_weights_read
        lora_inputs = self.largest_block_lora_inputs if checkpointing else self.lora_inputs
        return self.peak + (weights if dequantizing else 0) + (lora_inputs if mixed_precision else 0)


class _LiveTensors(TorchDispatchMode):
    """Within this mode, the bytes of the tensor storages that ops create and that are still alive, and their peak
    (each storage counted once, released when it is freed). The storages of `existing` tensors (weights, inputs) are
    never counted: an op's view of one (a weight's transpose) allocates nothing."""

    def __init__(self, existing: list):
        super().__init__()
        self.live = self.peak = 0
        self._known = {
            StorageWeakRef(tensor.untyped_storage()).cdata for tensor in existing if isinstance(tensor, torch.Tensor)
        }

    def _release(self, key: int, size: int) -> None:
        self.live -= size
        self._known.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(output)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = StorageWeakRef(storage).cdata
                if key not in self._known:
                    self._known.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._release, key, storage.nbytes())
        return output


class _FusedAttentionShapes(torch.autograd.Function):
    """`scaled_dot_product_attention` as the fused kernels run it (flash, memory-efficient; a GPU's and a CPU's): the
    backward keeps the query, key, value, output and a float32 log-sum-exp per query, never the attention matrix that
    the meta device's fallback (the math path) would keep; its backward makes the three input gradients. Shapes only."""

    @staticmethod
    def forward(ctx, query, key, value):
        output = query.new_empty(*query.shape[:-1], value.shape[-1])
        log_sum_exp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, output, log_sum_exp)
        return output

    @staticmethod
    def backward(ctx, grad):
        query, key, value, _, _ = ctx.saved_tensors
        return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


@contextlib.contextmanager
def _fused_attention():
    """Within this context `scaled_dot_product_attention` on meta tensors allocates what the fused kernels do
    (`_FusedAttentionShapes`). Replaced in `torch.nn.functional` itself, where diffusers' attention looks it up at each
    call, because the recomputation of checkpointed blocks in the backward runs outside any function mode."""
    original = nn.functional.scaled_dot_product_attention

    def attention(query, key, value, *args, **kwargs):
        if query.device.type != "meta":
            return original(query, key, value, *args, **kwargs)
        return _FusedAttentionShapes.apply(query, key, value)

    nn.functional.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        nn.functional.scaled_dot_product_attention = original


def probe_activations(denoiser: nn.Module, inputs: dict, training: bool, checkpointing: bool) -> ActivationProbe:
    """Run `denoiser` (on the meta device, its LoRA adapters attached) on `inputs`, with a backward of its output when
    `training` (with diffusers' gradient checkpointing when `checkpointing`), and record the peak of the live tensors
    and, without checkpointing, the frozen weights the backward reads and the LoRA inputs, block by block."""
    probe = ActivationProbe()
    frozen = {
        StorageWeakRef(p.untyped_storage()).cdata: stored_bytes(p)
        for p in denoiser.parameters()
        if not p.requires_grad
    }
    current, per_block, seen = [None], defaultdict(lambda: [0, 0]), set()

    def pack(tensor):
        key = StorageWeakRef(tensor.untyped_storage()).cdata
        if key in frozen and key not in seen:
            seen.add(key)
            per_block[current[-1]][0] += frozen[key]
        return tensor

    def lora_input(module, args):
        per_block[current[-1]][1] += args[0].untyped_storage().nbytes()

    def leave(module, args, output):
        current.pop()

    handles = []
    for index, block in enumerate(repeated_blocks(denoiser)):
        handles.append(block.register_forward_pre_hook(lambda module, args, index=index: current.append(index)))
        handles.append(block.register_forward_hook(leave))
    for layer in denoiser.modules():
        if isinstance(layer, LoraLayer):
            handles += [adapter.register_forward_pre_hook(lora_input) for adapter in layer.lora_A.values()]
    if checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train(training)
    live = _LiveTensors([*denoiser.parameters(), *denoiser.buffers(), *tree_flatten(inputs)[0]])
    try:
        with _fused_attention(), live, torch.set_grad_enabled(training):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                output = tree_flatten(denoiser(**inputs)[0])[0]  # one tensor, or Z-Image's list of them
            if training:
                sum(tensor.float().square().mean() for tensor in output).backward()
            del output
    finally:
        for handle in handles:
            handle.remove()
        if checkpointing:
            denoiser.disable_gradient_checkpointing()
    probe.peak = live.peak
    if training and not checkpointing:  # (checkpointed blocks save under their own hooks, out of `pack`'s sight)
        blocks = {index: values for index, values in per_block.items() if index is not None}
        probe.frozen_weights_read = sum(weights for weights, _ in per_block.values())
        probe.lora_inputs = sum(inputs for _, inputs in per_block.values())
        probe.largest_block_weights_read = max((weights for weights, _ in blocks.values()), default=0)
        probe.largest_block_lora_inputs = max((inputs for _, inputs in blocks.values()), default=0)
    return probe


@dataclass
class DenoiserShapes:
    """What the inputs of one denoiser call are sized by: `batch` images of `latent_side`² latent pixels (and
    `latent_frames` frames), `text_tokens` of text, `condition_images` condition images of `condition_side`² latent
    pixels, `image_tokens` of an image encoder's."""

    batch: int
    latent_side: int
    text_tokens: int
    dtype: torch.dtype
    condition_images: int = 0
    condition_side: int = 0
    latent_frames: int = 1
    image_tokens: int = 0

    def empty(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype or self.dtype, device="meta")

    def packed_tokens(self) -> int:
        """The 2 x 2 patches of the image and of its condition images (FLUX's and Qwen-Image's sequences)."""
        return (self.latent_side // 2) ** 2 + self.condition_images * (self.condition_side // 2) ** 2


def _flux_inputs(config, shapes: DenoiserShapes) -> dict:
    batch, text, tokens = shapes.batch, shapes.text_tokens, shapes.packed_tokens()
    return dict(
        hidden_states=shapes.empty(batch, tokens, config.in_channels),
        encoder_hidden_states=shapes.empty(batch, text, config.joint_attention_dim),
        pooled_projections=shapes.empty(batch, config.pooled_projection_dim),
        timestep=shapes.empty(batch),
        guidance=shapes.empty(batch, dtype=torch.float32) if config.guidance_embeds else None,
        txt_ids=shapes.empty(text, 3),
        img_ids=shapes.empty(tokens, 3),
        return_dict=False,
    )


def _qwen_image_inputs(config, shapes: DenoiserShapes) -> dict:
    image, condition = shapes.latent_side // 2, shapes.condition_side // 2
    return dict(
        hidden_states=shapes.empty(shapes.batch, shapes.packed_tokens(), config.in_channels),
        encoder_hidden_states=shapes.empty(shapes.batch, shapes.text_tokens, config.joint_attention_dim),
        encoder_hidden_states_mask=None,  # unpadded, as the adapter passes a batch without padding
        timestep=shapes.empty(shapes.batch),
        img_shapes=[[(1, image, image)] + [(1, condition, condition)] * shapes.condition_images] * shapes.batch,
        return_dict=False,
    )


def _sd3_inputs(config, shapes: DenoiserShapes) -> dict:
    batch, side = shapes.batch, shapes.latent_side
    return dict(
        hidden_states=shapes.empty(batch, config.in_channels, side, side),
        encoder_hidden_states=shapes.empty(batch, shapes.text_tokens, config.joint_attention_dim),
        pooled_projections=shapes.empty(batch, config.pooled_projection_dim),
        timestep=shapes.empty(batch),
        return_dict=False,
    )


def _unet_inputs(config, shapes: DenoiserShapes) -> dict:
    batch, side = shapes.batch, shapes.latent_side
    inputs = dict(
        sample=shapes.empty(batch, config.in_channels, side, side),
        timestep=shapes.empty(batch),
        encoder_hidden_states=shapes.empty(batch, shapes.text_tokens, config.cross_attention_dim),
        return_dict=False,
    )
    if config.addition_embed_type == "text_time":  # SDXL: the pooled text embedding and the six size numbers
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": shapes.empty(batch, pooled), "time_ids": shapes.empty(batch, 6)}
    return inputs


def _sana_inputs(config, shapes: DenoiserShapes) -> dict:
    batch, side = shapes.batch, shapes.latent_side
    return dict(
        hidden_states=shapes.empty(batch, config.in_channels, side, side),
        encoder_hidden_states=shapes.empty(batch, shapes.text_tokens, config.caption_channels),
        encoder_attention_mask=torch.ones(batch, shapes.text_tokens, dtype=torch.int64, device="meta"),
        timestep=shapes.empty(batch),
        return_dict=False,
    )


def _flux2_inputs(config, shapes: DenoiserShapes) -> dict:
    batch, text, tokens = shapes.batch, shapes.text_tokens, (shapes.latent_side // 2) ** 2
    return dict(
        hidden_states=shapes.empty(batch, tokens, config.in_channels),
        encoder_hidden_states=shapes.empty(batch, text, config.joint_attention_dim),
        timestep=shapes.empty(batch),
        guidance=None,
        txt_ids=shapes.empty(batch, text, 4, dtype=torch.int64),
        img_ids=shapes.empty(batch, tokens, 4, dtype=torch.int64),
        return_dict=False,
    )


def _z_image_inputs(config, shapes: DenoiserShapes) -> dict:
    # One single-frame latent and one unpadded caption per image, as lists (the prompt counted at its longest).
    side, images = shapes.latent_side, range(shapes.batch)
    return dict(
        x=[shapes.empty(config.in_channels, 1, side, side) for _ in images],
        t=shapes.empty(shapes.batch),
        cap_feats=[shapes.empty(shapes.text_tokens, config.cap_feat_dim) for _ in images],
        return_dict=False,
    )


def _wan_inputs(config, shapes: DenoiserShapes) -> dict:
    # Image-to-video: the condition latents join the noisy ones along the channels (in `in_channels`), and the image
    # encoder's tokens join the prompt's.
    batch, side = shapes.batch, shapes.latent_side
    inputs = dict(
        hidden_states=shapes.empty(batch, config.in_channels, shapes.latent_frames, side, side),
        timestep=shapes.empty(batch),
        encoder_hidden_states=shapes.empty(batch, shapes.text_tokens, config.text_dim),
        return_dict=False,
    )
    if config.image_dim is not None:
        inputs["encoder_hidden_states_image"] = shapes.empty(batch, shapes.image_tokens, config.image_dim)
    return inputs


#: Per denoiser class: its inputs as the family's adapter calls it, from its config and the call's shapes.
DENOISER_INPUTS = {
    "FluxTransformer2DModel": _flux_inputs,
    "Flux2Transformer2DModel": _flux2_inputs,
    "QwenImageTransformer2DModel": _qwen_image_inputs,
    "SD3Transformer2DModel": _sd3_inputs,
    "UNet2DConditionModel": _unet_inputs,
    "SanaTransformer2DModel": _sana_inputs,
    "ZImageTransformer2DModel": _z_image_inputs,
    "WanTransformer3DModel": _wan_inputs,
}


def video_latent_frames(configs: ModelConfigs, num_frames: int | None) -> int:
    """The latent frames of `num_frames` video frames (None: the model's default), as the video VAE compresses them:
    the first frame, then one latent frame per `2 ** (temporal downsamplings)` frames; 1 for an image model."""
    vae = configs.components.get("vae")
    if vae is None or "temperal_downsample" not in vae.config or configs.pipeline_class.startswith("QwenImage"):
        return 1
    if num_frames is None:
        num_frames = (
            configs.num_frames
            or inspect.signature(getattr(diffusers, configs.pipeline_class).__call__).parameters["num_frames"].default
        )
    return (num_frames - 1) // 2 ** sum(vae.config["temperal_downsample"]) + 1


def image_encoder_tokens(configs: ModelConfigs) -> int:
    """The tokens of a CLIP vision encoder's hidden states (its patches and the class token); 0 without one."""
    encoder = configs.components.get("image_encoder")
    if encoder is None:
        return 0
    return (encoder.config["image_size"] // encoder.config["patch_size"]) ** 2 + 1


def vae_scale_factor(configs: ModelConfigs) -> int:
    """How much the VAE shrinks each side of an image, as the pipelines compute it from its config (8 for every Hub
    model here; less for the tiny ones, whose VAEs have fewer blocks)."""
    vae = configs.components.get("vae")
    if vae is not None and "block_out_channels" in vae.config:
        return 2 ** (len(vae.config["block_out_channels"]) - 1)
    if vae is not None and "encoder_block_out_channels" in vae.config:  # SANA's deep-compression autoencoder
        return 2 ** (len(vae.config["encoder_block_out_channels"]) - 1)
    if vae is not None and "temperal_downsample" in vae.config:  # Qwen-Image's and Wan's (diffusers' spelling)
        return 2 ** len(vae.config["temperal_downsample"])
    return 8


def denoiser_inputs(
    denoiser: nn.Module,
    batch: int,
    resolution: int,
    text_tokens: int,
    dtype: torch.dtype,
    vae_scale: int = 8,
    condition_images: int = 0,
    condition_resolution: int | None = None,
    latent_frames: int = 1,
    image_tokens: int = 0,
) -> dict:
    """Meta tensors shaped as the adapters' denoiser call at `resolution` (square), with `text_tokens` of text and
    `condition_images` condition images (at `condition_resolution`, joined along the sequence). A `ValueError` for a
    denoiser whose inputs are not modelled yet."""
    name = type(denoiser).__name__
    if name not in DENOISER_INPUTS:
        raise ValueError(
            f"The activations of {name} are not modelled yet (those of {', '.join(DENOISER_INPUTS)} are)."
        )
    shapes = DenoiserShapes(
        batch,
        resolution // vae_scale,
        text_tokens,
        dtype,
        condition_images,
        (condition_resolution or resolution) // vae_scale,
        latent_frames,
        image_tokens,
    )
    return DENOISER_INPUTS[name](denoiser.config, shapes)


# ---------------------------------------------------------------------------------------------- the estimate


#: Per pipeline class: the text tokens the denoiser sees for `max_sequence_length` (as the adapters encode: FLUX.1
#: pads T5 to it; SD3 joins CLIP's 77 tokens to T5's; Qwen-Image pads to the batch's longest prompt, counted at the
#: most), the VAE's scale, and where condition images go (resolution: None is the run's, else a fixed side).
PIPELINE_SHAPES = {
    "FluxPipeline": dict(text_tokens=lambda length: min(length, 512)),
    "FluxKontextPipeline": dict(text_tokens=lambda length: min(length, 512), condition_images=1),
    "StableDiffusion3Pipeline": dict(text_tokens=lambda length: 77 + min(length, 512)),
    "QwenImagePipeline": dict(text_tokens=lambda length: min(length, 1024)),
    # CLIP's 77 tokens (SDXL: its two encoders' side by side, along the features).
    "StableDiffusionPipeline": dict(text_tokens=lambda length: 77),
    "StableDiffusionXLPipeline": dict(text_tokens=lambda length: 77),
    # The I2V transformer takes the prompt at exactly 512 positions (zero-padded; trl_nft.models.wan_i2v).
    "WanImageToVideoPipeline": dict(text_tokens=lambda length: 512),
    # The VL encoder sees each condition image at a 384² area (Edit: the VAE's 1024² image), about 188 (1338) tokens.
    "QwenImageEditPipeline": dict(
        text_tokens=lambda length: min(length, 1024) + 1338, condition_images=1, condition_resolution=1024
    ),
    "QwenImageEditPlusPipeline": dict(
        text_tokens=lambda length: min(length, 1024) + 188, condition_images=1, condition_resolution=1024
    ),
}


@dataclass
class Activations:
    """Activation bytes as a function of the images in a batch: `constant + per_image * images` (what a batch shares,
    such as the rotary embeddings or the dequantized weight copies, is the constant)."""

    constant: int
    per_image: int

    def __call__(self, images: int) -> int:
        return self.constant + self.per_image * images


#: Pipelines whose classifier-free guidance doubles the rollout batch (the others guide by an embedding or by a second
#: forward).
CFG_BATCH_PIPELINES = (
    "StableDiffusion3Pipeline",
    "StableDiffusionPipeline",
    "StableDiffusionXLPipeline",
    "SanaPipeline",
)


@dataclass
class MemoryEstimate:
    """The predicted memory of one process of a run, by term (bytes)."""

    weights: dict[str, tuple[str, int]]  # component -> (dtype or quantization, bytes)
    offloaded: list[str]  # components in CPU memory during training
    lora: int  # the adapters' weights (trained, old, EMA), float32
    gradients: int
    optimizer: int
    rollout: Activations
    training: Activations
    training_checkpointed: Activations
    rollout_batch: int  # images a rollout chunk samples at once (twice the prompts with a CFG batch)
    train_batch: int
    frozen_forward_batch: int  # images of the old (and reference) policies' forward: the old and reference in one
    checkpointing: bool
    optim: str

    @property
    def training_activations(self) -> int:
        """A micro-step's: the frozen policies' forward without gradients, then the policy's forward and backward."""
        trained = (self.training_checkpointed if self.checkpointing else self.training)(self.train_batch)
        return max(trained, self.rollout(self.frozen_forward_batch))

    @property
    def rollout_peak(self) -> int:
        return sum(b for _, b in self.weights.values()) + self.lora + self.rollout(self.rollout_batch)

    @property
    def training_peak(self) -> int:
        resident = sum(b for name, (_, b) in self.weights.items() if name not in self.offloaded)
        return resident + self.lora + self.optimizer + self.training_activations  # the activations hold the gradients

    @property
    def peak(self) -> int:
        return max(self.rollout_peak, self.training_peak)

    def table(self) -> str:
        """The estimate as a text table, in GiB (MiB for a peak under 1 GiB)."""
        lines = []
        unit, unit_name = (GIB, "GiB") if self.peak >= GIB else (2**20, "MiB")

        def row(term: str, value: int) -> None:
            lines.append(f"{term:<58}{value / unit:>9.2f}")

        lines.append(f"{'term':<58}{unit_name:>9}")
        for name, (kind, value) in self.weights.items():
            row(f"frozen {name} ({kind}){' - offloaded in training' if name in self.offloaded else ''}", value)
        row("LoRA adapters (trained, old, EMA; float32)", self.lora)
        row("LoRA gradients (part of the training activations)", self.gradients)
        row(f"optimizer state ({self.optim})", self.optimizer)
        row("rollout activations per image", self.rollout.per_image)
        row(f"rollout activations, {self.rollout_batch} images at a time", self.rollout(self.rollout_batch))
        row("training activations per image", self.training.per_image)
        row("  with activation checkpointing", self.training_checkpointed.per_image)
        checkpointed = " (checkpointed)" if self.checkpointing else ""
        row(f"training activations, {self.train_batch} images a micro-step{checkpointed}", self.training_activations)
        row("peak while sampling", self.rollout_peak)
        row("peak while training", self.training_peak)
        row("predicted peak", self.peak)
        return "\n".join(lines)


@dataclass(frozen=True)
class MemorySettings:
    """The settings of a run that its memory depends on (`NFTConfig` fields of the same names)."""

    dtype: torch.dtype = torch.bfloat16
    quantization: str | None = None
    gguf_file: str | None = None
    quantize_text_encoders: bool = False
    offload_text_encoders_and_vae: bool = False
    activation_checkpointing: bool = False
    per_device_train_batch_size: int = 8
    per_device_rollout_batch_size: int | None = None
    resolution: int | None = None
    num_frames: int | None = None
    max_sequence_length: int = 128
    guidance_scale: float = 1.0
    kl_coef: float = 1e-4
    ema_decay: float = 0.9
    reference_adapter: bool = False
    lora_r: int = 32
    lora_alpha: int = 64
    lora_target_modules: tuple[str, ...] | None = None
    optim: str = "adamw_torch"

    @classmethod
    def from_config(cls, args) -> "MemorySettings":
        """The settings of an `NFTConfig` (LoRA: a quantized base or full fine-tuning is not estimated otherwise)."""
        if not args.use_peft:
            raise ValueError("estimate-memory estimates LoRA runs (use_peft=True); full fine-tuning is not modelled.")
        return cls(
            dtype=torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32,
            quantization=args.quantization,
            gguf_file=args.gguf_file,
            quantize_text_encoders=args.quantize_text_encoders,
            offload_text_encoders_and_vae=args.offload_text_encoders_and_vae,
            activation_checkpointing=bool(args.activation_checkpointing or args.gradient_checkpointing),
            per_device_train_batch_size=args.per_device_train_batch_size,
            per_device_rollout_batch_size=args.per_device_rollout_batch_size,
            resolution=args.resolution,
            num_frames=args.num_frames,
            max_sequence_length=args.max_sequence_length,
            guidance_scale=args.guidance_scale,
            kl_coef=args.kl_coef,
            ema_decay=args.ema_decay,
            reference_adapter=getattr(args, "reference_refresh_steps", 0) > 0,
            lora_r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_target_modules=tuple(args.lora_target_modules) if args.lora_target_modules else None,
            optim=str(getattr(args.optim, "value", args.optim)),
        )


class MemoryModel:
    """A model's components on the meta device, its LoRA and its activation probes, for estimates of several settings
    that share the dtype, the LoRA, the resolution and the text length (`estimate`)."""

    def __init__(self, model: str | DiffusionPipeline, settings: MemorySettings, configs: ModelConfigs | None = None):
        from .models import ADAPTERS

        self.configs = configs or model_configs(model)
        pipeline_class = getattr(diffusers, self.configs.pipeline_class)
        adapter_class = next(a for a in ADAPTERS if issubclass(pipeline_class, a.pipeline_classes))
        self.denoiser_name, self.dtype = adapter_class.denoiser_name, settings.dtype
        self.modules = {name: component.instantiate() for name, component in self.configs.components.items()}
        # torch's `to`: diffusers' warns about float32 modules for a UNet, which keeps none, and this is a meta copy.
        denoiser = nn.Module.to(self.modules[self.denoiser_name], self.dtype).requires_grad_(False)
        target_modules = list(settings.lora_target_modules or adapter_class.lora_target_modules)
        lora_config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, target_modules=target_modules)
        self.lora = lora_parameters(denoiser, lora_config)
        shapes = PIPELINE_SHAPES.get(self.configs.pipeline_class, {})
        self.text_tokens = shapes.get("text_tokens", lambda length: length)(settings.max_sequence_length)
        self.resolution = settings.resolution or self.configs.resolution
        condition = {key: shapes[key] for key in ("condition_images", "condition_resolution") if key in shapes}
        condition["latent_frames"] = video_latent_frames(self.configs, settings.num_frames)
        condition["image_tokens"] = image_encoder_tokens(self.configs)
        vae_scale = vae_scale_factor(self.configs)
        self.cfg_batch = self.configs.pipeline_class in CFG_BATCH_PIPELINES

        def probes(training: bool, checkpointing: bool) -> tuple[ActivationProbe, ActivationProbe]:
            return tuple(
                probe_activations(
                    denoiser,
                    denoiser_inputs(
                        denoiser, batch, self.resolution, self.text_tokens, self.dtype, vae_scale, **condition
                    ),
                    training,
                    checkpointing,
                )
                for batch in (1, 2)
            )

        self.probes = {
            (training, checkpointing): probes(training, checkpointing)
            for training, checkpointing in [(False, False), (True, False), (True, True)]
        }
        for plain, checkpointed in zip(self.probes[(True, False)], self.probes[(True, True)], strict=True):
            # Under checkpointing one block's copies live at a time: the largest block's, as the plain forward shows.
            checkpointed.largest_block_weights_read = plain.largest_block_weights_read
            checkpointed.largest_block_lora_inputs = plain.largest_block_lora_inputs

    def activations(self, training: bool, checkpointing: bool, quantization: str | None) -> Activations:
        """The activations as a line in the number of images (from the probes at 1 and 2 images)."""
        one, two = self.probes[(training, checkpointing and training)]
        if training:
            dequantizing, mixed_precision = quantization in DEQUANTIZING_METHODS, self.dtype != torch.float32
            one, two = (probe.training(checkpointing, dequantizing, mixed_precision) for probe in (one, two))
        else:
            one, two = one.peak, two.peak
        return Activations(constant=max(2 * one - two, 0), per_image=two - one)

    def estimate(self, settings: MemorySettings) -> MemoryEstimate:
        """The estimate for `settings` (of the same dtype, LoRA, resolution and text length as this model's)."""
        gguf_types = None
        if settings.gguf_file and os.path.isfile(settings.gguf_file):
            gguf_types = gguf_tensor_types(settings.gguf_file)
        weights = {}
        for name, module in self.modules.items():
            is_denoiser = name == self.denoiser_name
            is_text_encoder = name.startswith("text_encoder")
            quantized = (
                settings.quantization if is_denoiser or (is_text_encoder and settings.quantize_text_encoders) else None
            )
            kind = quantized or str(self.dtype).removeprefix("torch.")
            if quantized == "gguf":
                kind = "gguf " + ", ".join(sorted(set(gguf_types.values())) if gguf_types else [_GGUF_DEFAULT_TYPE])
            weights[name] = (kind, weight_bytes(module, self.dtype, quantized, gguf_types if is_denoiser else None))
        offloaded = [
            name
            for name in weights
            if settings.offload_text_encoders_and_vae
            and (name.startswith("text_encoder") or name in ("vae", "image_encoder"))
        ]
        lora_numel = sum(param.numel() for param in self.lora)
        copies = 2 + (settings.ema_decay > 0) + settings.reference_adapter
        rollout_images = settings.per_device_rollout_batch_size or settings.per_device_train_batch_size
        train_batch = settings.per_device_train_batch_size
        return MemoryEstimate(
            weights=weights,
            offloaded=offloaded,
            lora=copies * 4 * lora_numel,
            gradients=4 * lora_numel,
            optimizer=optimizer_state_bytes(self.lora, settings.optim),
            rollout=self.activations(False, False, settings.quantization),
            training=self.activations(True, False, settings.quantization),
            training_checkpointed=self.activations(True, True, settings.quantization),
            rollout_batch=rollout_images * (2 if self.cfg_batch and settings.guidance_scale > 1 else 1),
            train_batch=train_batch,
            frozen_forward_batch=train_batch * (2 if settings.kl_coef > 0 else 1),
            checkpointing=settings.activation_checkpointing,
            optim=settings.optim,
        )


def estimate_memory(model: str | DiffusionPipeline, args) -> MemoryEstimate:
    """The predicted peak memory of one process of a LoRA run of `model` with `args` (an `NFTConfig`; nothing is
    checked against the machine: every quantization method is accepted)."""
    settings = MemorySettings.from_config(args)
    return MemoryModel(model, settings).estimate(settings)


#: What `cheapest_fitting_settings` adds, one after the other, roughly from the cheapest in time and quality: the
#: text encoders and VAE out of the way while training, activation checkpointing (about a third more training time),
#: one image a micro-step (same images per optimizer step, more accumulation), one image a rollout chunk, then a
#: quantized base, NF4, the text encoders quantized too, an 8-bit optimizer.
MEMORY_LEVERS = (
    {"offload_text_encoders_and_vae": True},
    {"activation_checkpointing": True},
    {"per_device_train_batch_size": 1},
    {"per_device_rollout_batch_size": 1},
    {"quantization": "int8-weight-only"},
    {"quantization": "nf4"},
    {"quantize_text_encoders": True},
    {"optim": "adamw_bnb_8bit"},
)


def cheapest_fitting_settings(
    memory_model: MemoryModel, settings: MemorySettings, gpu_memory: int
) -> tuple[dict, MemoryEstimate] | None:
    """The settings' own values, then the cumulative `MEMORY_LEVERS` one after the other (those that would not lower
    the memory skipped: a batch already at 1, a base already quantized): the first changes whose estimate fits
    `gpu_memory` bytes, and that estimate; None when even all of them do not fit."""
    changes: dict = {}
    for lever in ({}, *MEMORY_LEVERS):
        for key, value in lever.items():
            current = getattr(settings, key)
            if key == "quantization" and settings.quantization is not None:
                continue
            if key.endswith("batch_size") and (current or settings.per_device_train_batch_size) <= value:
                continue
            if current != value:
                changes[key] = value
        estimate = memory_model.estimate(replace(settings, **changes))
        if estimate.peak <= gpu_memory:
            return changes, estimate
    return None
