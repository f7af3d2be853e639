"""Wan 2.1 text-to-video (`WanPipeline`): the adapter encodes prompts as the pipeline does (UMT5, zero-padded to
`max_sequence_length`), makes the pipeline's own transformer call (timestep `1000 t`, the velocity as it is) on
five-dimensional latents, rolls out with the model's flow shift through the pipeline, decodes videos as the pipeline
does, trains on an image reward (scoring frames) and on a video-aware reward, shows its videos in TensorBoard and on
disk, and saves a LoRA that `WanPipeline.load_lora_weights` reproduces; `trl nft --model tiny-wan` runs end to end,
and sizes and frame counts the model cannot take are refused."""

import pytest
import torch
from datasets import Dataset
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from families import assert_the_saved_lora_reproduces_the_policy, module_calls, run_trl_nft
from learning import assert_beats_a_shuffled_control
from PIL import Image

from trl_nft import DiffusionNFTTrainer
from trl_nft.embedded import build_tiny_wan
from trl_nft.models import WanAdapter, get_adapter, load_pipeline
from trl_nft.rewards import get_reward, to_tensor


PROMPTS = ["a cat", "a photo of object number 3"]  # of different lengths: both are padded with zeros
MAX_SEQUENCE_LENGTH = 32
#: The pipeline's own settings for the tiny model's native video: 5 frames of 32 x 32 px.
CALL = dict(height=32, width=32, num_frames=5, max_sequence_length=MAX_SEQUENCE_LENGTH)


def test_tiny_wan_is_embedded_deterministic_and_pads_prompts_with_zeros():
    pipeline = load_pipeline("tiny-wan")
    adapter = get_adapter(pipeline, max_sequence_length=MAX_SEQUENCE_LENGTH)
    assert isinstance(adapter, WanAdapter) and adapter.produces_videos
    assert adapter.default_resolution() == 32 and adapter.num_frames == 5
    again, other = build_tiny_wan(seed=0), build_tiny_wan(seed=1)
    for name in ("transformer", "text_encoder", "vae"):
        ours, theirs = getattr(pipeline, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert not torch.equal(pipeline.transformer.proj_out.weight, other.transformer.proj_out.weight)
    layers = [name for name, module in pipeline.transformer.named_modules() if isinstance(module, torch.nn.Linear)]
    for target in WanAdapter.lora_target_modules:
        assert any(name.endswith("." + target) for name in layers), target

    conditioning = adapter.encode_prompts(PROMPTS)
    assert set(conditioning) == {"prompt_embeds"}  # CFG-free: no negative prompt
    embeds = conditioning["prompt_embeds"]
    assert embeds.shape == (2, MAX_SEQUENCE_LENGTH, pipeline.text_encoder.config.d_model)
    # Each prompt's own tokens, then zeros to `max_sequence_length`: the transformer attends to the whole.
    lengths = [len(pipeline.tokenizer(prompt).input_ids) for prompt in PROMPTS]
    assert lengths[0] != lengths[1]
    for row, length in zip(embeds, lengths, strict=True):
        assert row[:length].abs().sum(dim=1).min() > 0 and torch.equal(row[length:], torch.zeros_like(row[length:]))


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0], ids=["cfg-free", "cfg"])
def test_velocity_is_the_output_of_the_pipelines_own_transformer_call(guidance_scale):
    """The pipeline calls the transformer on `[B, C, F, h, w]` latents at the scheduler's timestep `1000 t` and steps
    with its output as the flow velocity; the adapter, given the same point at flow time `t`, makes the same call."""
    pipeline = build_tiny_wan()
    adapter = get_adapter(pipeline, guidance_scale=guidance_scale, max_sequence_length=MAX_SEQUENCE_LENGTH)
    adapter.set_sampler(None)
    calls = module_calls(
        pipeline.transformer,
        lambda: pipeline(
            PROMPTS,
            num_inference_steps=3,
            guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            **CALL,
        ),
    )
    conditioning = adapter.encode_prompts(PROMPTS)
    # One call per step, and with CFG a second one on the empty prompt's conditioning.
    assert len(calls) == (6 if adapter.classifier_free_guidance else 3)
    conditional = [(kwargs, output) for _, kwargs, output in calls if kwargs["encoder_hidden_states"] is not None]
    if adapter.classifier_free_guidance:  # each step: the prompt's call, then the empty prompt's
        negatives, conditional = [kwargs["encoder_hidden_states"] for kwargs, _ in conditional[1::2]], conditional[::2]
        assert all(torch.equal(negative, conditioning["negative_prompt_embeds"]) for negative in negatives)
    assert len(conditional) == 3
    for kwargs, output in conditional:
        assert torch.equal(kwargs["encoder_hidden_states"], conditioning["prompt_embeds"])
        latents = kwargs["hidden_states"]
        assert latents.shape == (2, 16, 2, 4, 4)  # 5 frames -> 2 latent frames, 32 px / 8
        with torch.no_grad():
            velocity = adapter.predict_velocity(pipeline.transformer, latents, kwargs["timestep"] / 1000, conditioning)
        torch.testing.assert_close(velocity, output, atol=1e-6, rtol=1e-6)


def test_rollouts_use_the_models_flow_shift_and_decode_videos_as_the_pipeline():
    adapter = get_adapter(build_tiny_wan(), max_sequence_length=MAX_SEQUENCE_LENGTH)
    adapter.set_sampler(None)
    scheduler = adapter.pipeline.scheduler
    # The default sampler, DPM-Solver++(2M) on flow sigmas, with the model's UniPC's `flow_shift` (3, for 480p).
    assert isinstance(scheduler, DPMSolverMultistepScheduler) and scheduler.config.flow_shift == 3.0
    conditioning = adapter.encode_prompts(PROMPTS)
    rollout = adapter.sample(conditioning, 4, 32, torch.Generator().manual_seed(0))
    assert rollout.latents.shape == (2, 16, 2, 4, 4)
    assert torch.equal(rollout.sigmas, scheduler.timesteps / 1000)
    torch.testing.assert_close(rollout.sigmas, torch.tensor([0.999, 0.899, 0.749, 0.499]))  # 1, .75, .5, .25 shifted

    videos = adapter.decode(rollout.latents)
    assert videos.shape == (2, 5, 3, 32, 32) and videos.dtype == torch.float32  # [B, F, C, H, W]
    assert 0 <= videos.min() and videos.max() <= 1
    expected = adapter.pipeline(
        PROMPTS,
        num_inference_steps=4,
        guidance_scale=1.0,  # the pipeline's default is 5
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **CALL,
    ).frames
    torch.testing.assert_close(videos, expected, atol=1e-5, rtol=0)

    # The model's own UniPC, or a FlowMatch sampler (whose shift is called `shift`), sample with its shift too; a
    # larger one (Wan's 5 for 720p) by sampler_kwargs.
    adapter.set_sampler("FlowMatchEulerDiscreteScheduler")
    assert isinstance(adapter.pipeline.scheduler, FlowMatchEulerDiscreteScheduler)
    assert adapter.pipeline.scheduler.config.shift == 3.0
    adapter.set_sampler(None, {"flow_shift": 5.0})
    assert adapter.pipeline.scheduler.config.flow_shift == 5.0


def test_guidance_is_cfg_against_the_empty_prompt():
    guided = get_adapter(build_tiny_wan(), guidance_scale=5.0, max_sequence_length=MAX_SEQUENCE_LENGTH)
    free = get_adapter(build_tiny_wan(), max_sequence_length=MAX_SEQUENCE_LENGTH)
    for adapter in (guided, free):
        adapter.set_sampler(None)
    conditioning = guided.encode_prompts(PROMPTS)
    empty = guided.pipeline.encode_prompt([""] * 2, do_classifier_free_guidance=False, max_sequence_length=32)[0]
    assert torch.equal(conditioning["negative_prompt_embeds"], empty)
    guided_latents = guided.sample(conditioning, 2, 32, torch.Generator().manual_seed(0)).latents
    free_latents = free.sample(free.encode_prompts(PROMPTS), 2, 32, torch.Generator().manual_seed(0)).latents
    assert (guided_latents - free_latents).abs().max() > 1e-3


def test_trains_shows_videos_in_tensorboard_and_on_disk_saves_and_reloads_in_diffusers(
    make_config, prompts_dataset, tmp_path
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = make_config(
        learning_rate=1e-2,
        kl_coef=1e-3,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        report_to="tensorboard",
        sample_logging_steps=1,
        sample_logging_num_images=3,
    )
    trainer = DiffusionNFTTrainer("tiny-wan", "jpeg_incompressibility", args=config, train_dataset=prompts_dataset)
    trainer.train()
    assert trainer.state.global_step == 2
    # Each sample of the grid is a strip of 4 of its 5 frames; the GIF plays the grid's videos, one grid per frame.
    samples = tmp_path / "run" / "samples"
    assert sorted(path.name for path in samples.iterdir()) == [
        "step_000001.gif",
        "step_000001.png",
        "step_000002.gif",
        "step_000002.png",
    ]
    assert Image.open(samples / "step_000001.png").size == (3 * 4 * 32, 32 + 36)  # strips of 32 px frames, captioned
    animation = Image.open(samples / "step_000001.gif")
    assert animation.n_frames == 5 and animation.size == (3 * 128, 128 + 36)
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent), size_guidance={"images": 0})
    events.Reload()
    assert [event.step for event in events.Images("train/samples")] == [1, 2]

    assert_the_saved_lora_reproduces_the_policy(trainer, build_tiny_wan, tmp_path / "lora", guidance_scale=1.0, **CALL)


def temporal_brightening(videos, prompts, **kwargs) -> list[float]:
    """A video-aware reward: how much brighter each video's last frame is than its first (in [-1, 1])."""
    return [(to_tensor(video[-1:]).mean() - to_tensor(video[:1]).mean()).item() for video in videos]


def jpeg_compressibility(images, prompts, **kwargs) -> list[float]:
    """The built-in image reward, scoring the videos' frames (every frame, averaged per video: the defaults)."""
    return get_reward("jpeg_compressibility")(images, prompts)


@pytest.mark.slow  # a learning run per family (the default suite keeps SD3's, tests/test_learning.py)
@pytest.mark.parametrize(
    ("reward", "minimum_gain"),
    # Measured (config seeds 0 / 1 / 2; the test runs 0), 40 steps: JPEG compressibility gain 0.097 / 0.109 / 0.080,
    # control -0.054 / -0.037 / -0.134; temporal brightening gain 0.036 / 0.034 / 0.031, control 0.011 / 0.007 / 0.002.
    # Brightness itself barely moves in this random model (gain 0.002 / 0.004 / 0.006), as in tiny-flux without
    # `proj_out`: its VAE normalises a shift of the latents away.
    [(jpeg_compressibility, 0.04), (temporal_brightening, 0.015)],
    ids=["built-in-image-reward-on-frames", "video-aware-reward"],
)
def test_reward_rises_and_beats_a_shuffled_reward_control(make_config, reward, minimum_gain):
    """With `proj_out` added to the default LoRA targets, as for the other tiny transformers."""

    assert_beats_a_shuffled_control(
        make_config,
        "tiny-wan",
        reward,
        minimum_gain=minimum_gain,
        minimum_margin=minimum_gain,
        num_inference_steps=4,
        learning_rate=3e-2,
        max_steps=40,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        lora_target_modules=[*WanAdapter.lora_target_modules, "proj_out"],
    )


def test_trl_nft_cli_trains_tiny_wan_and_writes_a_lora_and_a_model_card_with_videos(tmp_path):
    output_dir = run_trl_nft("tiny-wan", tmp_path, "--max_sequence_length", str(MAX_SEQUENCE_LENGTH))
    card = (output_dir / "README.md").read_text()
    assert "WanPipeline" in card and ".frames[0]" in card and "num_frames=5" in card
    gifs = sorted((output_dir / "images").glob("*.gif"))
    assert gifs and Image.open(gifs[0]).n_frames == 5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"resolution": 40}, r"resolution=40 cannot be generated by this Wan model.*multiple of 16"),
        ({"num_frames": 6}, r"num_frames=6 cannot be generated by this Wan model.*Set `num_frames` to 5 or 9"),
        ({"num_frames": 0}, r"num_frames"),
    ],
    ids=["resolution", "frames", "no-frames"],
)
def test_bad_settings_are_refused_at_construction(make_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        DiffusionNFTTrainer(
            "tiny-wan",
            "jpeg_compressibility",
            args=make_config(**overrides),
            train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}),
        )


def test_frames_on_an_image_model_and_wan_2_2_are_refused(make_config):
    with pytest.raises(ValueError, match=r"num_frames=5 applies to video models, but StableDiffusion3Pipeline"):
        DiffusionNFTTrainer(
            "tiny-sd3",
            "jpeg_compressibility",
            args=make_config(num_frames=5),
            train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}),
        )
    pipeline = build_tiny_wan()
    pipeline.register_modules(transformer_2=WanTransformer3DModel.from_config(pipeline.transformer.config))
    with pytest.raises(ValueError, match=r"Wan 2.2 model.*wan2.1-1.3b"):
        get_adapter(pipeline)
