"""How the denoiser's forwards run: in the weights' dtype for rollouts, the old and reference policies in one batch,
and the repeated blocks compiled. Each is exact (up to float rounding) and none changes what is computed."""

import contextlib

import torch
from peft.tuners.lora import LoraLayer
from torch import nn


#: The adapter name PEFT's mixed-adapter batches read as "no adapter" (the base model).
BASE_MODEL = "__base__"


@contextlib.contextmanager
def weights_dtype_forward(module: nn.Module):
    """Within this context `module` runs its own forward instead of accelerate's mixed-precision wrapper (autocast,
    outputs cast to float32), as a plain diffusers pipeline runs it.

    Under the wrapper the denoiser returns float32, so a pipeline's latents turn float32 after the first sampler step
    and every later step runs its elementwise work on float32 tensors. Rollouts need no autocast: the frozen weights
    are already in the mixed-precision dtype, and PEFT casts a layer's input to its float32 LoRA weights and back."""
    wrapped, original = module.__dict__.get("forward"), module.__dict__.get("_original_forward")
    if wrapped is None or original is None:  # not prepared by accelerate under mixed precision
        yield module
        return
    module.forward = original
    try:
        yield module
    finally:
        module.forward = wrapped


@contextlib.contextmanager
def mixed_adapter_batch(module: nn.Module, adapter_names: list[str]):
    """Within this context each sample `i` of a batch through `module` runs with the LoRA adapter `adapter_names[i]`
    (`BASE_MODEL`: none), as PEFT's `adapter_names` argument does for a `PeftModel`: one forward for several policies
    that share the frozen weights. The base layers see the whole batch; each adapter only its samples."""

    def pass_adapter_names(layer, args, kwargs):
        return args, {**kwargs, "adapter_names": adapter_names}

    handles = [
        layer.register_forward_pre_hook(pass_adapter_names, with_kwargs=True)
        for layer in module.modules()
        if isinstance(layer, LoraLayer)
    ]
    try:
        yield module
    finally:
        for handle in handles:
            handle.remove()


def repeat_batch(values: dict[str, torch.Tensor], times: int) -> dict[str, torch.Tensor]:
    """Batch-first tensors repeated `times` times along the batch (block after block)."""
    return {key: torch.cat([value] * times) for key, value in values.items()}


def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of the denoiser `module`, outermost first (a block inside another is left out): the classes
    the model names in diffusers' `_repeated_blocks`, else the entries of every `nn.ModuleList` of two or more modules
    of one class (SD3's `transformer_blocks`, SANA's, ...)."""
    named = set(getattr(module, "_repeated_blocks", None) or ())
    if named:
        candidates = [m for m in module.modules() if type(m).__name__ in named]
    else:
        candidates = [
            block
            for blocks in module.modules()
            if isinstance(blocks, nn.ModuleList) and len(blocks) > 1 and len({type(block) for block in blocks}) == 1
            for block in blocks
        ]
    outermost, inside = [], set()
    for block in candidates:  # parents come before their children
        if id(block) not in inside:
            outermost.append(block)
            inside.update(id(m) for m in block.modules())
    return outermost


def compile_repeated_blocks(module: nn.Module, **compile_kwargs) -> int:
    """Compile, in place, each repeated block of the denoiser `module` (regional compilation: one graph serves every
    block of a class, so compiling takes seconds, not minutes) and return how many. A model that names its block classes
    in `_repeated_blocks` (FLUX, Qwen-Image, Wan, ...) is compiled by diffusers' own
    `ModelMixin.compile_repeated_blocks`; for the others (SD3, SANA) the blocks are the entries of every `nn.ModuleList`
    of two or more modules of one class, outermost first. In place, so the pipeline's rollouts, the frozen forwards and
    the training forward all run the compiled blocks; `compile_kwargs` go to `torch.compile`. Run them within
    `compiled_blocks_settings`."""
    blocks = repeated_blocks(module)
    if getattr(module, "_repeated_blocks", None):
        module.compile_repeated_blocks(**compile_kwargs)
        return len(blocks)
    if not blocks:
        raise ValueError(
            f"torch_compile: {type(module).__name__} has no repeated blocks to compile (no `_repeated_blocks` and no "
            "list of identical blocks); run without torch_compile."
        )
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


#: Graphs dynamo may keep per compiled block: one per block structure (SD3.5-Medium: dual-attention, plain and last
#: blocks) and policy state (the rollout's old adapter, the frozen policies' mixed batch, the trained adapter with
#: gradients, evaluation), 12 for SD3.5-Medium, past dynamo's default of 8, beyond which it would run the rest eagerly.
RECOMPILE_LIMIT = 64


def compiled_blocks_settings(compiled: bool):
    """A context in which blocks compiled by `compile_repeated_blocks` (when `compiled`) keep all their graphs: dynamo's
    `recompile_limit` raised to `RECOMPILE_LIMIT`, and restored when it ends (it is a setting of the whole process)."""
    if not compiled:
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT))
