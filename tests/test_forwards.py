"""How the denoiser's forwards run (trl_nft/forwards.py): rollouts in the mixed-precision dtype under accelerate,
the old and reference policies in one forward, and `torch_compile` of the repeated blocks."""

import logging
import math

import pytest
import torch
from datasets import Dataset
from diffusers import SD3Transformer2DModel
from torch._dynamo.utils import counters
from transformers import TrainerCallback

from trl_nft import DiffusionNFTTrainer, build_tiny_sd3
from trl_nft.embedded.tiny_flux import build_tiny_flux
from trl_nft.forwards import compile_repeated_blocks


ROWS = [{"prompt": f"a photo of object number {i // 4}"} for i in range(8)]


def test_bf16_rollouts_under_accelerate_stay_bf16_and_equal_the_plain_pipelines(make_config):
    """accelerate's mixed-precision wrapper makes the denoiser return float32; rollouts bypass it, so every sampler
    step runs on bf16 latents, exactly as the diffusers pipeline runs without accelerate."""
    config = make_config(bf16=True, use_cpu=True, per_device_train_batch_size=8)
    trainer = DiffusionNFTTrainer(
        "tiny-sd3", "jpeg_compressibility", args=config, train_dataset=Dataset.from_list(ROWS)
    )
    plain = trainer._generate_and_score(ROWS)["latents"]  # before `train()` prepares the model: no wrapper yet

    trainer.accelerator.prepare(trainer.model)  # what `train()` does: autocast + float32 outputs around forward
    denoiser = trainer.adapter.denoiser
    assert "_original_forward" in denoiser.__dict__
    dtypes = []
    hook = denoiser.register_forward_hook(
        lambda module, args, kwargs, output: dtypes.append((kwargs["hidden_states"].dtype, output[0].dtype)),
        with_kwargs=True,
    )
    rollout = trainer._generate_and_score(ROWS)
    hook.remove()
    prepared = rollout["latents"]
    assert dtypes == [(torch.bfloat16, torch.bfloat16)] * config.num_inference_steps
    assert prepared.dtype == torch.float32  # kept in float32 for the training targets
    assert torch.equal(prepared, plain)
    # The training forwards still run under the wrapper: autocast, float32 velocities for the loss.
    conditioning = {key: value[:2] for key, value in rollout["conditioning"].items()}
    velocity = trainer.adapter.predict_velocity(denoiser, prepared[:2], torch.full((2,), 0.5), conditioning)
    assert velocity.dtype == torch.float32


def test_full_fine_tuning_runs_in_bf16_mixed_precision(make_config, prompts_dataset):
    """Full fine-tuning keeps float32 weights for the trained, old (EMA) and reference copies; under bf16 mixed
    precision their rollouts, frozen forwards and evaluations run under autocast, in bf16, like the training forward."""
    config = make_config(
        bf16=True,
        use_cpu=True,
        use_peft=False,
        kl_coef=1e-3,
        learning_rate=1e-5,
        max_steps=1,
        eval_strategy="steps",
        eval_steps=1,
    )
    trainer = DiffusionNFTTrainer(
        "tiny-sd3", "jpeg_compressibility", args=config, train_dataset=prompts_dataset, eval_dataset=prompts_dataset
    )
    outputs = []
    for module in (trainer.policies.old_model, trainer.policies.ref_model, trainer.model):
        module.register_forward_hook(lambda module, args, output: outputs.append(output[0].dtype))
    old_before = [p.detach().clone() for p in trainer.policies.old_model.parameters()]
    trainer.train()
    assert {p.dtype for p in trainer.policies.old_model.parameters()} == {torch.float32}
    assert set(outputs[: config.num_inference_steps]) == {torch.bfloat16}  # the rollout, old policy under autocast
    assert any(not torch.equal(a, b) for a, b in zip(old_before, trainer.policies.old_model.parameters(), strict=True))
    assert math.isfinite(trainer.state.log_history[-2]["eval_reward"])


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-sd", "tiny-flux", "tiny-qwen-image", "tiny-sana", "tiny-wan"])
def test_old_and_reference_velocities_from_one_forward_equal_two_forwards(make_config, model):
    """With LoRA and kl_coef > 0, one forward of the doubled batch (old adapter on one half, none on the other) gives
    the velocities of the old policy and of the base model computed apart, as PEFT and diffusers compute them."""
    config = make_config(kl_coef=1e-2, num_inference_steps=2, per_device_train_batch_size=4)
    trainer = DiffusionNFTTrainer(model, "jpeg_compressibility", args=config, train_dataset=Dataset.from_list(ROWS))
    with torch.no_grad():  # an old policy away from the base, so that the two halves differ
        for param in trainer.policies.old:
            param.add_(torch.randn_like(param), alpha=0.1)
    rollout = trainer._generate_and_score(ROWS[:4])
    noisy, sigmas, conditioning = torch.randn_like(rollout["latents"]), torch.rand(4), rollout["conditioning"]
    samples = [{"noisy": noisy, "sigmas": sigmas}, {"noisy": noisy.flip(0), "sigmas": sigmas.flip(0)}]
    batch_sizes = []
    hook = trainer.adapter.denoiser.register_forward_hook(
        lambda module, args, kwargs, output: batch_sizes.append(len(output[0])), with_kwargs=True
    )
    with torch.no_grad():
        trainer._frozen_velocities(samples, conditioning)
    hook.remove()
    assert batch_sizes == [8, 8]  # one forward per time, for both policies
    for sample in samples:
        with torch.no_grad():
            with trainer.policies.acting_as_old() as old_policy:
                old = trainer.adapter.predict_velocity(old_policy, sample["noisy"], sample["sigmas"], conditioning)
            with trainer.policies.acting_as_reference() as reference:
                base = trainer.adapter.predict_velocity(reference, sample["noisy"], sample["sigmas"], conditioning)
        torch.testing.assert_close(sample["old_velocity"], old, atol=1e-5, rtol=0)
        torch.testing.assert_close(sample["reference_velocity"], base, atol=1e-5, rtol=0)
        assert (old - base).abs().max() > 1e-2


class _GraphCounts(TrainerCallback):
    """The compiled graphs dynamo has made by the end of each step, and the trained weights after the first."""

    def __init__(self, trained_params: list[torch.Tensor]):
        self.per_step, self.trained_params, self.after_first_step = [], trained_params, None

    def on_step_end(self, args, state, control, **kwargs):
        self.per_step.append(counters["stats"]["unique_graphs"])
        if state.global_step == 1:
            self.after_first_step = [p.detach().clone() for p in self.trained_params]


def _sd35_shaped_tiny_pipeline():
    """tiny-sd3 with a transformer shaped like SD3.5-Medium's: dual-attention, plain and last (context-pre-only)
    blocks, RMS qk-norm. Its three block structures times the policy states make more graphs than dynamo's default
    limit of 8 per function."""
    pipeline = build_tiny_sd3()
    config = {**pipeline.transformer.config, "num_layers": 3, "dual_attention_layers": (0,), "qk_norm": "rms_norm"}
    torch.manual_seed(0)
    pipeline.transformer = SD3Transformer2DModel.from_config(config)
    return pipeline


@pytest.mark.parametrize(
    "use_peft",
    [pytest.param(True, id="lora-sd35-shaped", marks=pytest.mark.slow), pytest.param(False, id="full")],
)
def test_torch_compile_compiles_each_policys_blocks_once_and_trains_as_eager(
    make_config, prompts_dataset, use_peft, monkeypatch, request
):
    """`torch_compile` compiles the denoiser's blocks in place: the rollouts, the old and reference forwards, the
    training forward and evaluation run them; each block structure and policy state (trained, old, no adapter, the
    mixed batch, evaluation) compiles once, by the first evaluation, and none runs uncompiled for want of room in
    dynamo's cache; the first update is the eager one. (Later steps drift apart by Adam's normalised updates of weights
    whose gradients round differently around 0.) The `aot_eager` backend traces what inductor would compile, forward
    and backward, without a C++ toolchain's minutes."""

    def trainer(max_steps: int, **overrides) -> DiffusionNFTTrainer:
        learning_rate = 1e-2 if use_peft else 1e-4  # full fine-tuning moves every weight
        config = make_config(
            max_steps=max_steps, kl_coef=1e-2, learning_rate=learning_rate, use_peft=use_peft, **overrides
        )
        model = _sd35_shaped_tiny_pipeline() if use_peft else "tiny-sd3"
        evaluation = prompts_dataset.select(range(4))
        return DiffusionNFTTrainer(
            model, "jpeg_compressibility", args=config, train_dataset=prompts_dataset, eval_dataset=evaluation
        )

    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")  # restored afterwards: TrainingArguments sets it
    request.addfinalizer(torch._dynamo.reset)  # the compiled graphs and their guards would slow every later test
    torch._dynamo.reset()
    counters.clear()
    recompile_limit = torch._dynamo.config.recompile_limit
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    dynamo_logger = logging.getLogger("torch._dynamo")
    dynamo_logger.addHandler(handler)
    try:
        compiled = trainer(
            4, torch_compile=True, torch_compile_backend="aot_eager", eval_strategy="steps", eval_steps=1
        )
        graphs = _GraphCounts(compiled.policies.trained)
        compiled.add_callback(graphs)
        compiled.train()
    finally:
        dynamo_logger.removeHandler(handler)
    eager = trainer(1)
    eager.train()

    assert all(block._compiled_call_impl is not None for block in compiled.adapter.denoiser.transformer_blocks)
    assert not isinstance(compiled.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)  # not compiled twice
    assert not [message for message in warnings if "recompile_limit" in message]
    assert torch._dynamo.config.recompile_limit == recompile_limit  # raised while training only
    # The first step makes the training graphs, the evaluation after it its own; nothing recompiles after that.
    assert graphs.per_step[0] > 0 and graphs.per_step[2:] == [graphs.per_step[1]] * 2
    for a, b in zip(graphs.after_first_step, eager.policies.trained, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_compile_repeated_blocks_takes_the_outermost_lists_of_identical_blocks():
    inner = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
    blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(2, 2), inner) for _ in range(3)])
    model = torch.nn.Module()
    model.blocks, model.head = blocks, torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.ReLU()])
    assert compile_repeated_blocks(model, backend="eager") == 3
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert inner[0]._compiled_call_impl is None and model.head[0]._compiled_call_impl is None
    with pytest.raises(ValueError, match="no repeated blocks"):
        compile_repeated_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)), backend="eager")


def test_a_model_that_names_its_blocks_is_compiled_by_diffusers_own_regional_compilation(monkeypatch):
    transformer = build_tiny_flux().transformer
    assert transformer._repeated_blocks  # FluxTransformerBlock, FluxSingleTransformerBlock
    calls = []
    diffusers_compile = type(transformer).compile_repeated_blocks

    def recorded(self, **kwargs):
        calls.append(kwargs)
        return diffusers_compile(self, **kwargs)

    monkeypatch.setattr(type(transformer), "compile_repeated_blocks", recorded)
    count = compile_repeated_blocks(transformer, backend="eager")
    assert calls == [{"backend": "eager"}]
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    assert count == len(blocks) and all(block._compiled_call_impl is not None for block in blocks)
