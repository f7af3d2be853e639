"""FLUX.2-klein (`Flux2KleinPipeline`): the adapter makes the pipeline's own transformer calls (three Qwen3 layers per
token, packed batch-normalised latents, 4-D positions), rolls out through the pipeline, trains, learns, and saves a
LoRA that `Flux2KleinPipeline.load_lora_weights` reproduces; `trl nft --model tiny-flux2-klein` runs end to end, and
settings the model cannot take are refused."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from diffusers import DPMSolverMultistepScheduler
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from families import assert_the_saved_lora_reproduces_the_policy, module_calls, run_trl_nft
from learning import assert_beats_a_shuffled_control, brightness
from PIL import Image

from trl_nft import DiffusionNFTTrainer
from trl_nft.embedded import build_tiny_flux2_klein
from trl_nft.models import Flux2KleinAdapter, get_adapter, load_pipeline


PROMPTS = ["a photo of a cat", "a red cube on a table"]


def test_tiny_flux2_klein_is_embedded_deterministic_and_formats_prompts_as_qwen3():
    pipeline = load_pipeline("tiny-flux2-klein")
    adapter = get_adapter(pipeline)
    assert isinstance(adapter, Flux2KleinAdapter) and adapter.is_distilled and adapter.default_resolution() == 64
    again = build_tiny_flux2_klein(seed=0)
    for name in ("transformer", "text_encoder", "vae"):
        ours, theirs = getattr(pipeline, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert not torch.equal(pipeline.vae.bn.running_mean, build_tiny_flux2_klein(seed=1).vae.bn.running_mean)
    # Every default LoRA target names layers of the diffusers transformer.
    layers = [name for name, module in pipeline.transformer.named_modules() if isinstance(module, torch.nn.Linear)]
    for target in Flux2KleinAdapter.lora_target_modules:
        assert any(name.endswith("." + target) for name in layers), target
    # The pipeline's chat formatting, thinking off, as Qwen3's template renders it.
    text = pipeline.tokenizer.apply_chat_template(
        [{"role": "user", "content": "a cat"}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert text == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


@pytest.mark.parametrize(
    ("is_distilled", "guidance_scale"), [(True, 1.0), (False, 4.0)], ids=["distilled", "base-cfg"]
)
def test_predict_velocity_is_the_pipelines_own_transformer_call(is_distilled, guidance_scale):
    """The transformer calls the pipeline makes from the prompts are recorded; given the same point and time, the
    adapter makes the same call (conditioning, positions, no guidance input) and gets the same velocity."""
    pipeline = build_tiny_flux2_klein(is_distilled=is_distilled)
    adapter = get_adapter(pipeline, guidance_scale=guidance_scale, max_sequence_length=32)
    assert adapter.classifier_free_guidance == (not is_distilled)
    calls = module_calls(
        pipeline.transformer,
        lambda: pipeline(
            prompt=PROMPTS,
            num_inference_steps=2,
            guidance_scale=guidance_scale,
            max_sequence_length=32,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ),
    )
    conditioning = adapter.encode_prompts(PROMPTS)
    passes = 2 if adapter.classifier_free_guidance else 1
    assert len(calls) == 2 * passes
    if adapter.classifier_free_guidance:  # each step's second pass is on the empty prompt
        negative = conditioning["negative_prompt_embeds"]
        assert all(torch.equal(kwargs["encoder_hidden_states"], negative) for _, kwargs, _ in calls[1::2])
    for _, kwargs, output in calls[::passes]:
        assert torch.equal(kwargs["encoder_hidden_states"], conditioning["prompt_embeds"])
        ours = module_calls(
            pipeline.transformer,
            lambda kwargs=kwargs: adapter.predict_velocity(
                pipeline.transformer, kwargs["hidden_states"], kwargs["timestep"], conditioning
            ),
        )
        [(_, our_kwargs, velocity)] = ours
        for name in ("hidden_states", "timestep", "encoder_hidden_states", "txt_ids", "img_ids"):
            assert torch.equal(our_kwargs[name], kwargs[name]), name
        assert our_kwargs["guidance"] is None and kwargs["guidance"] is None
        torch.testing.assert_close(velocity, output, atol=1e-6, rtol=1e-6)


def test_rollouts_are_the_pipelines_own_on_the_shifted_time_grid():
    adapter = get_adapter(build_tiny_flux2_klein(), max_sequence_length=32)
    adapter.set_sampler(None)
    assert isinstance(adapter.pipeline.scheduler, DPMSolverMultistepScheduler)  # the default: DPM-Solver++(2M)
    conditioning = adapter.encode_prompts(PROMPTS)
    assert set(conditioning) == {"prompt_embeds"}  # distilled: no negative prompt
    rollout = adapter.sample(conditioning, 4, 64, torch.Generator().manual_seed(0))
    assert rollout.latents.shape == (2, 16, 16)  # 8 x 8 latents of 4 channels, in 2 x 2 patches: 4 x 4 tokens
    # The flow times the transformer was called at (`timestep / 1000`), noisiest first, all in (0, 1]; the shift is
    # exp(mu) with the pipeline's empirical mu for 16 tokens and 4 steps.
    assert torch.equal(rollout.sigmas, adapter.pipeline.scheduler.timesteps / 1000)
    assert len(rollout.sigmas) == 4 and torch.all(rollout.sigmas[:-1] > rollout.sigmas[1:])
    assert 0 < rollout.sigmas.min() and rollout.sigmas.max() <= 1
    assert adapter.pipeline.scheduler.config.flow_shift == pytest.approx(np.exp(compute_empirical_mu(16, 4)))

    images = adapter.decode(rollout.latents)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32
    expected = adapter.pipeline(
        prompt=PROMPTS,
        num_inference_steps=4,
        guidance_scale=1.0,
        max_sequence_length=32,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)


def test_trains_saves_and_reloads_in_diffusers(make_config, prompts_dataset, tmp_path):
    config = make_config(learning_rate=1e-2, kl_coef=1e-3, max_sequence_length=32)
    trainer = DiffusionNFTTrainer(
        "tiny-flux2-klein", "jpeg_incompressibility", args=config, train_dataset=prompts_dataset
    )
    trainer.train()
    assert trainer.state.global_step == 2
    assert_the_saved_lora_reproduces_the_policy(
        trainer, build_tiny_flux2_klein, tmp_path / "lora", guidance_scale=1.0, max_sequence_length=32
    )


@pytest.mark.slow  # a learning run per family (the default suite keeps SD3's, tests/test_learning.py)
def test_reward_rises_and_beats_a_shuffled_reward_control(make_config):
    """Brightness, with `proj_out` added to the default LoRA targets: through the attention and feed-forward
    projections alone this random two-block model barely moves its images' brightness in 40 steps (gain 0.007 / 0.005 /
    0.004 at seeds 0 / 1 / 2, control 0.005 / -0.000 / -0.002); with the output projection it does."""

    # Measured (config seeds 0 / 1 / 2; the test runs 0): gain 0.088 / 0.072 / 0.073, control 0.014 / 0.006 / 0.018.
    assert_beats_a_shuffled_control(
        make_config,
        "tiny-flux2-klein",
        brightness,
        minimum_gain=0.035,
        minimum_margin=0.025,
        num_inference_steps=4,
        learning_rate=3e-2,
        max_steps=40,
        max_sequence_length=32,
        lora_target_modules=[*Flux2KleinAdapter.lora_target_modules, "proj_out"],
    )


def test_trl_nft_cli_trains_tiny_flux2_klein_and_writes_a_lora_and_a_model_card(tmp_path):
    output_dir = run_trl_nft("tiny-flux2-klein", tmp_path, "--max_sequence_length", "32")
    assert "Flux2KleinPipeline" in (output_dir / "README.md").read_text()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"resolution": 72}, r"resolution=72 cannot be generated by this FLUX.2-klein model.*multiple of 16"),
        ({"guidance_scale": 3.5}, r"guidance_scale=3.5 .*step-distilled"),
        ({"sampler": "FlowMatchHeunDiscreteScheduler"}, r"shifts with the image size"),
        (
            {"sampler": DPMSolverMultistepScheduler()},  # a VP instance: no flow sigmas, and it takes none
            r"sampler='DPMSolverMultistepScheduler' cannot sample FLUX.2-klein",
        ),
    ],
    ids=["resolution", "guidance-on-distilled", "sampler-without-mu", "sampler-without-sigmas"],
)
def test_bad_settings_are_refused_at_construction(make_config, prompts_dataset, overrides, message):
    with pytest.raises(ValueError, match=message):
        DiffusionNFTTrainer(
            "tiny-flux2-klein", "jpeg_compressibility", args=make_config(**overrides), train_dataset=prompts_dataset
        )


# Reference images (`Flux2KleinPipeline(image=...)`): optional; the rows above are text-only and unchanged.


def _references(count: int, seed: int = 0, size=(64, 64)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


def _stock_latents(pipeline, prompt_embeds, references, generator, **call) -> torch.Tensor:
    """The denoiser's latents at the end of a 3-step stock rollout with `references` (the same for every prompt), as
    the pipeline hands its step-end callback (its `output_type="latent"` is the VAE's, unpacked)."""
    final = {}

    def keep_latents(pipeline, step, timestep, tensors):
        final["latents"] = tensors["latents"]
        return {}

    pipeline(
        image=references,
        prompt_embeds=prompt_embeds,
        height=64,
        width=64,
        num_inference_steps=3,
        max_sequence_length=32,
        generator=generator,
        callback_on_step_end=keep_latents,
        output_type="latent",
        **call,
    )
    return final["latents"]


@pytest.mark.parametrize(
    ("is_distilled", "guidance_scale"), [(True, 1.0), (False, 4.0)], ids=["distilled", "base-cfg"]
)
def test_reference_images_make_the_pipelines_own_transformer_calls_and_rollouts(is_distilled, guidance_scale):
    """Two references shared by the batch, as the stock pipeline takes them: the adapter's training forward makes the
    pipeline's transformer call (references after the target, at T = 10 and 20, the output cut back to the target)
    and its rollout is the pipeline's, CFG pass included."""
    pipeline = build_tiny_flux2_klein(is_distilled=is_distilled)
    adapter = get_adapter(pipeline, guidance_scale=guidance_scale, max_sequence_length=32)
    assert adapter.image_conditioning == "optional" and adapter.max_condition_images == 4
    references = _references(2)
    conditioning = adapter.encode_conditions(PROMPTS, [references, references], 64)
    # Padded to 4 references of 16 tokens each, so that rows of any count share one shape; the counts are kept.
    assert conditioning["image_latents"].shape == (2, 64, 16) and conditioning["image_latent_ids"].shape == (2, 64, 4)
    assert conditioning["image_counts"].tolist() == [2, 2]
    call = {"guidance_scale": guidance_scale}
    if adapter.classifier_free_guidance:
        call["negative_prompt_embeds"] = conditioning["negative_prompt_embeds"]
    generators = [torch.Generator().manual_seed(index) for index in range(2)]
    calls = module_calls(
        pipeline.transformer,
        lambda: _stock_latents(pipeline, conditioning["prompt_embeds"], references, generators, **call),
    )
    passes = 2 if adapter.classifier_free_guidance else 1
    assert len(calls) == 3 * passes
    for _, kwargs, output in calls[::passes]:
        assert kwargs["hidden_states"].shape == (2, 48, 16)  # the target's 16 tokens, then 2 x 16 references'
        assert kwargs["img_ids"][0, :, 0].tolist() == [0] * 16 + [10] * 16 + [20] * 16
        target = kwargs["hidden_states"][:, :16]
        [(_, ours, velocity)] = module_calls(
            pipeline.transformer,
            lambda target=target, kwargs=kwargs: adapter.predict_velocity(
                pipeline.transformer, target, kwargs["timestep"], conditioning
            ),
        )
        for name in ("hidden_states", "timestep", "encoder_hidden_states", "txt_ids", "img_ids"):
            assert torch.equal(ours[name], kwargs[name]), name
        with torch.no_grad():
            cut = adapter.predict_velocity(pipeline.transformer, target, kwargs["timestep"], conditioning)
        torch.testing.assert_close(cut, output[:, :16], rtol=1e-5, atol=0)
        torch.testing.assert_close(velocity, output, rtol=1e-5, atol=0)

    generators = [torch.Generator().manual_seed(index) for index in range(2)]
    expected = _stock_latents(pipeline, conditioning["prompt_embeds"], references, generators, **call)
    generators = [torch.Generator().manual_seed(index) for index in range(2)]
    rollout = adapter.sample(conditioning, 3, 64, generators)
    torch.testing.assert_close(rollout.latents, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(rollout.sigmas, pipeline.scheduler.timesteps / 1000)


def test_rows_with_their_own_references_of_any_count_and_size_batch_as_the_pipeline_samples_each(caplog):
    """A row with one reference (of another size: resized to the resolution, said in the log) and a row with two batch
    together (padding masked out of attention) and get what the stock pipeline gives each row on its own."""
    adapter = get_adapter(build_tiny_flux2_klein(), max_sequence_length=32)
    adapter.set_sampler(None)
    pipeline = adapter.pipeline
    rows = [_references(1, seed=1, size=(96, 80)), _references(2, seed=2)]
    with caplog.at_level("WARNING"):
        conditioning = adapter.encode_conditions(PROMPTS, rows, 64)
    assert any("resized to 64 x 64 pixels" in record.getMessage() for record in caplog.records)
    assert conditioning["image_counts"].tolist() == [1, 2]
    rollout = adapter.sample(conditioning, 3, 64, [torch.Generator().manual_seed(index) for index in range(2)])
    noisy, times = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0.8, 0.3])
    with torch.no_grad():
        velocity = adapter.predict_velocity(pipeline.transformer, noisy, times, conditioning)
    for index, row in enumerate(rows):
        references = [pipeline.image_processor.resize(image, 64, 64) for image in row]
        prompt_embeds = conditioning["prompt_embeds"][index : index + 1]
        expected = _stock_latents(pipeline, prompt_embeds, references, torch.Generator().manual_seed(index))
        torch.testing.assert_close(rollout.latents[index : index + 1], expected, rtol=1e-5, atol=1e-5)
        alone = {key: value[index : index + 1] for key, value in conditioning.items()}
        with torch.no_grad():
            own = adapter.predict_velocity(
                pipeline.transformer, noisy[index : index + 1], times[index : index + 1], alone
            )
        torch.testing.assert_close(velocity[index : index + 1], own, rtol=1e-5, atol=1e-6)


def test_text_only_rows_are_encoded_as_before():
    adapter = get_adapter(build_tiny_flux2_klein(), max_sequence_length=32)
    conditioning = adapter.encode_conditions(PROMPTS, None, 64)
    assert set(conditioning) == {"prompt_embeds"}
    assert torch.equal(conditioning["prompt_embeds"], adapter.encode_prompts(PROMPTS)["prompt_embeds"])


def test_bad_reference_images_are_refused_naming_the_fix():
    adapter = get_adapter(build_tiny_flux2_klein(), max_sequence_length=32)
    with pytest.raises(ValueError, match=r"'a photo of a cat' has 5 condition images .* at most 4 per row"):
        adapter.encode_conditions(PROMPTS[:1], [_references(5)], 64)
    with pytest.raises(
        ValueError, match=r"resolution=48 is too small for FLUX.2-klein's reference images.*64 or more"
    ):
        adapter.encode_conditions(PROMPTS[:1], [_references(1)], 48)


def test_trains_with_reference_images_its_rewards_see_them_and_the_lora_reloads(make_config, tmp_path):
    """Rows of one to four references, two rows a rollout: each reward sees its row's references (a list, as the rows
    hold them), the rollouts, the prompt cache and the fused old-and-reference forward batch rows of different counts,
    and the LoRA reloads."""
    references = _references(10, seed=3)
    rows = [references[:1], references[1:3], references[3:6], references[6:10]]
    prompts = [f"object number {index} in the style of the references" for index in range(4)]
    dataset = Dataset.from_dict({"prompt": prompts, "image": rows})
    seen = []

    def brightness_of_the_image(images, prompts, condition_images, **kwargs):
        seen.extend(zip(prompts, condition_images, strict=True))
        return [float(np.asarray(image, dtype=np.float32).mean()) / 255 for image in images]

    # Kept encodings of rows of different counts stack: every row is padded to 4 references.
    config = make_config(
        learning_rate=1e-2, kl_coef=1e-3, max_sequence_length=32, num_generations=2, prompt_embedding_cache_size=8
    )
    trainer = DiffusionNFTTrainer("tiny-flux2-klein", brightness_of_the_image, args=config, train_dataset=dataset)
    counts, encode = [], trainer.adapter.encode_conditions
    trainer.adapter.encode_conditions = lambda prompts, images, resolution: (
        counts.append(sorted(map(len, images))) or encode(prompts, images, resolution)
    )
    trainer.train()
    assert trainer.state.global_step == 2
    assert any(len(set(rollout)) == 2 for rollout in counts)  # rows of two counts in one rollout
    assert len(seen) >= 8
    for prompt, condition in seen:  # each sample's reward got its own row's references
        expected = rows[prompts.index(prompt)]
        assert isinstance(condition, list) and len(condition) == len(expected)
        assert all(
            np.array_equal(np.asarray(ours), np.asarray(theirs))
            for ours, theirs in zip(condition, expected, strict=True)
        )
    assert_the_saved_lora_reproduces_the_policy(
        trainer, build_tiny_flux2_klein, tmp_path / "lora", image=rows[1], guidance_scale=1.0, max_sequence_length=32
    )
