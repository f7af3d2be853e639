"""A quantized frozen base (`NFTConfig.quantization`): tiny-flux and tiny-qwen-image train through the public API on a
torchao int8 base and on a GGUF denoiser written here, the frozen denoiser at most 60% of its bf16 bytes, only the LoRA
weights change, and the saved LoRA loads into the unquantized pipeline; the fused old + reference forward is exact on
the quantized base; what cannot train is refused before the model loads."""

import re

import gguf
import numpy as np
import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

import trl_nft.nft_trainer
from trl_nft import DiffusionNFTTrainer
from trl_nft.embedded import EMBEDDED_MODELS
from trl_nft.memory import module_bytes, stored_bytes


def write_gguf(module: torch.nn.Module, path, quant_type: gguf.GGMLQuantizationType) -> None:
    """`module`'s weights as a GGUF file with diffusers' names (as `from_single_file` reads one): each 2-D weight whose
    rows divide into `quant_type`'s blocks quantized by gguf's own `quantize`, the rest float16."""
    writer = gguf.GGUFWriter(str(path), arch="trl-nft-test")
    block_size, _ = gguf.GGML_QUANT_SIZES[quant_type]
    for name, tensor in module.state_dict().items():
        array = tensor.detach().float().numpy()
        if array.ndim == 2 and array.shape[1] % block_size == 0:
            writer.add_tensor(name, gguf.quants.quantize(array, quant_type), raw_dtype=quant_type)
        else:
            writer.add_tensor(name, array.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _inner_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    if hasattr(tensor, "__tensor_flatten__"):
        return [inner for name in tensor.__tensor_flatten__()[0] for inner in _inner_tensors(getattr(tensor, name))]
    return [tensor.detach().clone()]


def _without_adapter_name(name: str) -> str:
    return re.sub(r"\.lora_([AB])\.[^.]+\.", r".lora_\1.", name)


def _quantization_args(method: str, model: str, tmp_path) -> dict:
    if method != "gguf":
        return {"quantization": method}
    path = tmp_path / f"{model}-Q8_0.gguf"
    write_gguf(EMBEDDED_MODELS[model]().transformer, path, gguf.GGMLQuantizationType.Q8_0)
    return {"quantization": "gguf", "gguf_file": str(path)}


@pytest.mark.parametrize("method", ["int8-weight-only", "gguf"])
@pytest.mark.parametrize("model", ["tiny-flux", "tiny-qwen-image"])
def test_a_quantized_base_trains_its_lora_only_and_the_lora_loads_unquantized(
    make_config, prompts_dataset, tmp_path, model, method
):
    config = make_config(bf16=True, use_cpu=True, num_inference_steps=2, **_quantization_args(method, model, tmp_path))
    trainer = DiffusionNFTTrainer(model, "jpeg_compressibility", args=config, train_dataset=prompts_dataset)
    denoiser = trainer.model
    bf16_bytes = sum(2 * p.numel() for p in EMBEDDED_MODELS[model]().transformer.parameters())
    # The quantized tensors' own storage (int8 values and scales, GGUF blocks): measured 0.56-0.57 for int8
    # weight-only, 0.55-0.56 for Q8_0; anything left unconverted beyond diffusers' choice would push it past 0.6.
    assert module_bytes(denoiser) <= 0.6 * bf16_bytes
    assert any(hasattr(p, "quant_type") or hasattr(p, "__tensor_flatten__") for p in denoiser.parameters())
    before = {name: _inner_tensors(param) for name, param in denoiser.named_parameters()}
    trainer.train()
    changed = {
        name
        for name, param in denoiser.named_parameters()
        if not all(torch.equal(a, b) for a, b in zip(before[name], _inner_tensors(param), strict=True))
    }
    assert changed and all(".lora_" in name for name in changed)  # the trained adapter and its old copy
    assert any(".default." in name for name in changed)

    output_dir = tmp_path / "lora"
    trainer.save_model(str(output_dir))
    fresh, base = EMBEDDED_MODELS[model](), EMBEDDED_MODELS[model]()
    fresh.load_lora_weights(str(output_dir))
    saved = load_file(output_dir / "pytorch_lora_weights.safetensors")
    loaded = {_without_adapter_name(n): p.detach() for n, p in fresh.transformer.named_parameters() if ".lora_" in n}
    assert len(loaded) == len(saved) == len(trainer.policies.trained)
    for name, value in saved.items():  # the adapter reloads exactly, into the unquantized denoiser
        torch.testing.assert_close(loaded[name.removeprefix("transformer.")], value, atol=0, rtol=0)

    def sample(pipeline) -> np.ndarray:
        generator = torch.Generator().manual_seed(5)
        return pipeline(["a photo"], num_inference_steps=2, generator=generator, output_type="np").images

    assert np.abs(sample(fresh) - sample(base)).max() > 1e-4


@pytest.mark.parametrize("method", ["int8-weight-only", "gguf"])
def test_the_old_and_reference_forward_stays_fused_and_exact_on_a_quantized_base(make_config, tmp_path, method):
    """On the quantized base the old adapter and the base (adapters off) still run as one forward of the doubled batch
    (PEFT's mixed-adapter batch through torchao's and GGUF's LoRA layers), equal to the two forwards apart."""
    config = make_config(kl_coef=1e-2, num_inference_steps=2, **_quantization_args(method, "tiny-flux", tmp_path))
    rows = Dataset.from_dict({"prompt": [f"a photo of object number {i}" for i in range(4)]})
    trainer = DiffusionNFTTrainer("tiny-flux", "jpeg_compressibility", args=config, train_dataset=rows)
    with torch.no_grad():
        for param in trainer.policies.old:
            param.add_(torch.randn_like(param), alpha=0.1)
    rollout = trainer._generate_and_score([rows[i] for i in range(4)])
    noisy, sigmas, conditioning = torch.randn_like(rollout["latents"]), torch.rand(4), rollout["conditioning"]
    samples = [{"noisy": noisy, "sigmas": sigmas}]
    batch_sizes = []
    hook = trainer.adapter.denoiser.register_forward_hook(
        lambda module, args, kwargs, output: batch_sizes.append(len(output[0])), with_kwargs=True
    )
    with torch.no_grad():
        trainer._frozen_velocities(samples, conditioning)
    hook.remove()
    assert batch_sizes == [8]
    with torch.no_grad():
        with trainer.policies.acting_as_old() as old_policy:
            old = trainer.adapter.predict_velocity(old_policy, noisy, sigmas, conditioning)
        with trainer.policies.acting_as_reference() as reference:
            base = trainer.adapter.predict_velocity(reference, noisy, sigmas, conditioning)
    torch.testing.assert_close(samples[0]["old_velocity"], old, atol=1e-5, rtol=0)
    torch.testing.assert_close(samples[0]["reference_velocity"], base, atol=1e-5, rtol=0)
    assert (old - base).abs().max() > 1e-2


def test_quantized_text_encoders_load_quantized(make_config, prompts_dataset):
    config = make_config(quantization="int8-weight-only", quantize_text_encoders=True, num_inference_steps=2)
    trainer = DiffusionNFTTrainer("tiny-flux", "jpeg_compressibility", args=config, train_dataset=prompts_dataset)
    for encoder in trainer.adapter.text_encoders:
        weights = [m.weight for m in encoder.modules() if isinstance(m, torch.nn.Linear)]
        assert weights and all(stored_bytes(w) < w.numel() * w.element_size() for w in weights)
    trainer.train()


REFUSALS = [
    ({"quantization": "int8-dynamic"}, r"int8-dynamic.*no gradient.*int8-weight-only"),
    ({"quantization": "int8-weight-only", "use_peft": False}, r"use_peft=False.*LoRA"),
    ({"quantization": "gguf", "gguf_file": "missing.gguf"}, r"gguf_file='missing.gguf' is not a file"),
    ({"optim": "adamw_bnb_8bit"}, r"adamw_bnb_8bit.*CUDA GPU.*bitsandbytes.*adamw_torch"),
]
if not torch.cuda.is_available():
    REFUSALS += [
        ({"quantization": "nf4"}, r"nf4.*needs a CUDA GPU.*int8-weight-only"),
        ({"quantization": "int8"}, r"int8.*needs a CUDA GPU.*int8-weight-only"),
    ]


@pytest.mark.parametrize(("settings", "message"), REFUSALS)
def test_what_cannot_train_is_refused_before_the_model_loads(
    make_config, prompts_dataset, monkeypatch, settings, message
):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(trl_nft.nft_trainer, "load_pipeline", no_loading)
    config = make_config(**settings)  # NFTConfig itself accepts every value, on any machine
    with pytest.raises(ValueError, match=message):
        DiffusionNFTTrainer("tiny-flux", "jpeg_compressibility", args=config, train_dataset=prompts_dataset)
