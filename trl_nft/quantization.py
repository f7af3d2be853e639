"""A quantized frozen base (`NFTConfig.quantization`): the denoiser (and with `quantize_text_encoders` the text encoders)
loaded through diffusers' quantization configs, under trainable LoRA adapters.

diffusers quantizes only while it loads (`from_pretrained`, `from_single_file`), so every model reaches a quantized
base that way: a Hub id or a folder directly, an embedded model or a pipeline instance after being saved to a temporary
folder. The LoRA adapters train in float32 on top, as diffusers' QLoRA scripts set them up; the old adapter and the
reference (adapters off) run on the same quantized weights.

    method              backend          where              weights of each quantized linear layer
    nf4                 bitsandbytes     CUDA GPU           4 bit (+ a float32 scale per 64)
    int8                bitsandbytes     CUDA GPU           int8 (+ a float32 scale per row)
    int8-weight-only    torchao          CPU and GPU        int8 (+ a scale per row)
    fp8-weight-only     torchao          CPU, GPU sm >= 8.9 float8 e4m3 (+ a scale per row)
    gguf                GGUF             CPU and GPU        the `.gguf` file's own types (Q8_0, Q4_0, Q4_K, ...)

Refused when the trainer is built, before the model loads: `int8-dynamic` (torchao's dynamic-activation int8, whose
outputs carry no gradient, although diffusers lists it as trainable), bitsandbytes without a CUDA GPU, full fine-tuning
of a quantized base. `NFTConfig` itself accepts every method on any machine (so does `trl-nft estimate-memory`).
"""

import importlib.util
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline, PipelineQuantizationConfig


#: The values of `NFTConfig.quantization` (besides None).
QUANTIZATION_METHODS = ("nf4", "int8", "int8-weight-only", "fp8-weight-only", "gguf", "int8-dynamic")
#: transformers' optimizers that keep their state in 8 bits with bitsandbytes (`--optim`).
BITSANDBYTES_OPTIMIZERS = ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "lion_8bit", "paged_lion_8bit")
_BITSANDBYTES_METHODS = ("nf4", "int8")
_TEXT_ENCODER_PREFIX = "text_encoder"  # diffusers' component names: text_encoder, text_encoder_2, ...
#: The sizes a tiny builder fixes in code rather than in a config, which `save_pretrained` therefore does not keep.
_NATIVE_SIZE_ATTRIBUTES = ("default_sample_size", "default_num_frames")


@dataclass(frozen=True)
class Quantization:
    """How the frozen base is quantized: `method` (one of `QUANTIZATION_METHODS`), the GGUF denoiser file for
    `"gguf"`, and whether the text encoders are quantized too."""

    method: str
    gguf_file: str | None = None
    text_encoders: bool = False

    @classmethod
    def from_config(cls, args, use_lora: bool) -> "Quantization | None":
        """The quantization `args` (an `NFTConfig`) asks for, or None; a `ValueError` naming what works instead when
        it cannot train on this machine. Called before the model loads. Also refuses the 8-bit optimizers without
        bitsandbytes and a CUDA GPU."""
        on_gpu = torch.cuda.is_available() and not args.use_cpu
        if args.optim in BITSANDBYTES_OPTIMIZERS and not (on_gpu and _has_bitsandbytes()):
            raise ValueError(
                f"optim={args.optim!r} keeps the optimizer state in 8 bits with bitsandbytes, which needs a CUDA GPU "
                "and `pip install bitsandbytes`. Without them use optim='adamw_torch' (the LoRA's optimizer state is "
                "small next to the frozen weights)."
            )
        if args.quantization is None:
            return None
        method = args.quantization
        if method == "int8-dynamic":
            raise ValueError(
                "quantization='int8-dynamic' (torchao's dynamic-activation int8) cannot train: its layers' outputs "
                "carry no gradient, so the LoRA adapters on them would learn nothing. Use "
                "quantization='int8-weight-only' (the same int8 weights, activations in the compute dtype)."
            )
        if not use_lora:
            raise ValueError(
                f"quantization={method!r} freezes the denoiser's weights in a quantized form, which full fine-tuning "
                "(use_peft=False) cannot update. Train LoRA adapters on the quantized base (use_peft=True), or train "
                "all weights without quantization."
            )
        if method in _BITSANDBYTES_METHODS and not (on_gpu and _has_bitsandbytes()):
            raise ValueError(
                f"quantization={method!r} is bitsandbytes', which needs a CUDA GPU (diffusers loads bitsandbytes "
                "models on a GPU only) and `pip install bitsandbytes`. Without them, use "
                "quantization='int8-weight-only' (torchao, CPU and GPU) or 'gguf' with gguf_file=PATH."
            )
        if method == "fp8-weight-only" and on_gpu and torch.cuda.get_device_capability() < (8, 9):
            major, minor = torch.cuda.get_device_capability()
            raise ValueError(
                f"quantization='fp8-weight-only' needs a GPU with float8 support (compute capability 8.9 or newer: "
                f"Ada, Hopper), this one has {major}.{minor}. Use quantization='int8-weight-only' or 'nf4'."
            )
        if method == "gguf":
            if not os.path.isfile(args.gguf_file):
                raise ValueError(f"gguf_file={args.gguf_file!r} is not a file: give the path of a .gguf denoiser.")
            if args.quantize_text_encoders:
                raise ValueError(
                    "quantize_text_encoders=True with quantization='gguf': a GGUF file holds the denoiser only, and "
                    "diffusers has no GGUF config for the text encoders. Set quantize_text_encoders=False, or use "
                    "quantization='int8-weight-only' for both."
                )
        if method in ("int8-weight-only", "fp8-weight-only", "gguf"):
            package = "gguf" if method == "gguf" else "torchao"
            if importlib.util.find_spec(package) is None:
                raise ValueError(
                    f"quantization={method!r} needs the {package} package: pip install 'trl-nft[quantization]'."
                )
        return cls(method, args.gguf_file, args.quantize_text_encoders)

    def load(
        self,
        source: str | DiffusionPipeline,
        torch_dtype: torch.dtype,
        denoiser_name_of: Callable[[str], str],
    ) -> DiffusionPipeline:
        """The pipeline of `source` (a Hub id or folder, or a pipeline instance, saved to a temporary folder first)
        with its denoiser (and text encoders) quantized as this says; `denoiser_name_of(pipeline_class_name)` names
        the denoiser's component. Weights that stay unquantized are in `torch_dtype`, the compute dtype."""
        if isinstance(source, str):
            return self._load(source, torch_dtype, denoiser_name_of)
        with tempfile.TemporaryDirectory(prefix="trl-nft-quantize-") as folder:
            source.save_pretrained(folder)
            pipeline = self._load(folder, torch_dtype, denoiser_name_of)
        for attribute in _NATIVE_SIZE_ATTRIBUTES:
            if hasattr(source, attribute):
                setattr(pipeline, attribute, getattr(source, attribute))
        pipeline.register_to_config(_name_or_path=source.name_or_path)  # not the temporary folder
        return pipeline

    def _load(self, path: str, torch_dtype: torch.dtype, denoiser_name_of: Callable[[str], str]) -> DiffusionPipeline:
        index = DiffusionPipeline.load_config(path)  # model_index.json: {component: [library, class], ...}
        denoiser = denoiser_name_of(index["_class_name"])
        text_encoders = [name for name in index if name.startswith(_TEXT_ENCODER_PREFIX) and index[name][0]]
        mapping = {name: self.config(torch_dtype, "transformers") for name in text_encoders if self.text_encoders}
        overrides = {}
        if self.method == "gguf":  # a single file with the denoiser's weights; its config from the pipeline's folder
            import diffusers
            from diffusers import GGUFQuantizationConfig

            denoiser_class = getattr(diffusers, index[denoiser][1])
            overrides[denoiser] = denoiser_class.from_single_file(
                self.gguf_file,
                config=path,
                subfolder=denoiser,
                quantization_config=GGUFQuantizationConfig(compute_dtype=torch_dtype),
                torch_dtype=torch_dtype,
            )
        else:
            mapping[denoiser] = self.config(torch_dtype, "diffusers")
        quantization_config = PipelineQuantizationConfig(quant_mapping=mapping) if mapping else None
        return DiffusionPipeline.from_pretrained(
            path, quantization_config=quantization_config, torch_dtype=torch_dtype, **overrides
        )

    def config(self, compute_dtype: torch.dtype, library: str):
        """The quantization config of one component: `library` is `"diffusers"` (the denoiser) or `"transformers"`
        (a text encoder), whose configs have the same names and arguments."""
        if library == "diffusers":
            import diffusers as configs
        else:
            import transformers as configs
        if self.method == "nf4":
            return configs.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
            )
        if self.method == "int8":
            return configs.BitsAndBytesConfig(load_in_8bit=True)
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

        weights = Int8WeightOnlyConfig() if self.method == "int8-weight-only" else Float8WeightOnlyConfig()
        return configs.TorchAoConfig(weights)


def _has_bitsandbytes() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None
