"""Qwen-Image-Edit (`QwenImageEditPipeline`) and Qwen-Image-Edit-2509 / -2511 (`QwenImageEditPlusPipeline`): the
adapters encode a row's prompt with its images as the pipelines do, make the pipelines' own transformer calls (the
conditions' tokens after the target's, `img_shapes` listing every grid, 2511's `zero_cond_t`), also for a batch of
rows of different condition sizes and counts, roll out exactly as the pipelines do from the same images, train from a
dataset with an `image` column whose rewards see the condition images, and save a LoRA that the pipelines'
`load_lora_weights` reproduces; bad input is refused."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from families import assert_the_saved_lora_reproduces_the_policy, module_calls
from PIL import Image

from trl_nft import DiffusionNFTTrainer
from trl_nft.embedded import build_tiny_qwen_image_edit, build_tiny_qwen_image_edit_plus
from trl_nft.models import (
    QwenImageEditAdapter,
    QwenImageEditPlusAdapter,
    get_adapter,
    load_pipeline,
    resolve_model_name,
)


SAMPLER = "FlowMatchEulerDiscreteScheduler"  # the model's own: the rollout tests compare with the stock pipeline's
PROMPTS = ["make the sky red", "add a hat to the cat", "turn it into a watercolour painting"]


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# 4:3 images are taken at 1184 x 896 (37 x 28 tokens of the tiny VAE's 32 px), squares at 1024 x 1024 (32 x 32).
WIDE, SQUARE, SMALL_WIDE = _image(64, 48, 0), _image(40, 40, 1), _image(32, 24, 2)
#: Each family's rows of condition images: of two layouts, the first and the last rows sharing one; Edit-Plus's rows
#: carry two images or one.
ROWS = {
    "edit": [[WIDE], [SQUARE], [SMALL_WIDE]],
    "edit-2511": [[WIDE, SQUARE], [SQUARE], [SMALL_WIDE, SQUARE]],
}
BUILDERS = {"edit": build_tiny_qwen_image_edit, "edit-2511": lambda: build_tiny_qwen_image_edit_plus(zero_cond_t=True)}


def _adapter(family: str, **kwargs) -> QwenImageEditAdapter:
    adapter = get_adapter(BUILDERS[family](), **kwargs)
    adapter.set_sampler(SAMPLER)
    return adapter


def _stock_image(family: str, row: list[Image.Image]):
    """A row's `image` as a user hands it to the stock pipeline: Edit takes one image, Edit-Plus a list."""
    return row[0] if family == "edit" else row


def test_tiny_edit_pipelines_are_embedded_deterministic_and_keep_the_images_after_the_template():
    edit, plus = load_pipeline("tiny-qwen-image-edit"), load_pipeline("tiny-qwen-image-edit-plus")
    assert isinstance(edit, QwenImageEditPipeline) and isinstance(plus, QwenImageEditPlusPipeline)
    assert type(get_adapter(edit)) is QwenImageEditAdapter and type(get_adapter(plus)) is QwenImageEditPlusAdapter
    assert get_adapter(edit).max_condition_images == 1 and get_adapter(plus).max_condition_images is None
    assert get_adapter(edit).image_conditioning == get_adapter(plus).image_conditioning == "required"
    assert get_adapter(edit).default_resolution() == 64
    assert not plus.transformer.config.zero_cond_t  # as Qwen-Image-Edit-2509's; -2511's modulates conditions at t = 0
    assert build_tiny_qwen_image_edit_plus(zero_cond_t=True).transformer.config.zero_cond_t
    for alias, hub_id in [
        ("qwen-image-edit", "Qwen/Qwen-Image-Edit"),
        ("qwen-image-edit-2509", "Qwen/Qwen-Image-Edit-2509"),
        ("qwen-image-edit-2511", "Qwen/Qwen-Image-Edit-2511"),
    ]:
        assert resolve_model_name(alias) == hub_id
    again = build_tiny_qwen_image_edit(seed=0)
    for name in ("transformer", "text_encoder", "vae"):
        ours, theirs = getattr(edit, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert not torch.equal(
        edit.transformer.img_in.weight, build_tiny_qwen_image_edit(seed=1).transformer.img_in.weight
    )
    # The pipelines drop the template's first `prompt_template_encode_start_idx` tokens: exactly its system part, so
    # what the transformer reads is the images' vision tokens and the prompt, as with Qwen's tokenizer.
    for pipeline in (edit, plus):
        system_part = pipeline.prompt_template_encode.split("<|im_start|>user\n")[0] + "<|im_start|>user\n"
        assert len(pipeline.tokenizer(system_part).input_ids) == pipeline.prompt_template_encode_start_idx == 64


@pytest.mark.parametrize("family", ["edit", "edit-2511"])
def test_predict_velocity_is_the_pipelines_own_transformer_call_for_rows_of_mixed_sizes(family):
    """Each row's stock edit (its prompt and images as a user passes them) is recorded; the adapter's conditioning of
    the three rows holds each row's prompt embeddings and condition tokens as the pipeline made them, and its one
    `predict_velocity` on the whole batch makes one transformer call per layout of condition grids, each the
    pipeline's, and returns every row's velocity of the target's tokens."""
    adapter = _adapter(family)
    pipeline, rows = adapter.pipeline, ROWS[family]
    conditioning = adapter.encode_conditions(PROMPTS, rows, 64)
    assert set(conditioning) == {"prompt_embeds", "prompt_embeds_mask", "image_latents", "image_shapes"}
    stock = []  # each row's last transformer call: its keyword arguments and its output
    for prompt, row, seed in zip(PROMPTS, rows, range(3), strict=True):
        run = lambda prompt=prompt, row=row, seed=seed: pipeline(  # noqa: E731
            image=_stock_image(family, row),
            prompt=prompt,
            height=64,
            width=64,
            num_inference_steps=2,
            true_cfg_scale=1.0,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
        )
        stock.append(module_calls(pipeline.transformer, run)[-1][1:])
    for index, (kwargs, _) in enumerate(stock):
        length = int(conditioning["prompt_embeds_mask"][index].sum())
        torch.testing.assert_close(conditioning["prompt_embeds"][index, :length], kwargs["encoder_hidden_states"][0])
        condition = kwargs["hidden_states"][0, 4:]  # after the target's 2 x 2 tokens
        torch.testing.assert_close(conditioning["image_latents"][index, : len(condition)], condition)
    # The target's grid, then each condition's (the 4:3 one at 1184 x 896, the square one at 1024 x 1024).
    grids = [(2, 2), (28, 37), (32, 32)][: 1 + len(rows[0])]
    assert stock[0][0]["img_shapes"] == [[(1, *grid) for grid in grids]]

    targets = torch.cat([kwargs["hidden_states"][:, :4] for kwargs, _ in stock])
    times = torch.cat([kwargs["timestep"] for kwargs, _ in stock])
    calls = module_calls(
        pipeline.transformer, lambda: adapter.predict_velocity(pipeline.transformer, targets, times, conditioning)
    )
    assert [call[1]["img_shapes"] for call in calls] == [
        [stock[0][0]["img_shapes"][0]] * 2,  # the first and the last rows, one layout
        stock[1][0]["img_shapes"],
    ]
    with torch.no_grad():
        velocity = adapter.predict_velocity(pipeline.transformer, targets, times, conditioning)
    assert velocity.shape == targets.shape  # the loss sees the generated tokens only
    expected = torch.cat([output[:, :4] for _, output in stock])
    torch.testing.assert_close(velocity, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["edit", "edit-2511"])
def test_rollouts_are_the_pipelines_own_edits_with_guidance(family):
    """With true CFG (the negative prompt, like the prompt, encoded with the row's images), a rollout of rows of two
    layouts is, row by row, what the stock pipeline samples from the prompt, the negative prompt and the images as a
    user passes them, with the same generator; it keeps the target's latents only."""
    adapter = _adapter(family, guidance_scale=4.0)
    pipeline, rows = adapter.pipeline, ROWS[family][:2]
    conditioning = adapter.encode_conditions(PROMPTS[:2], rows, 64)
    assert {"negative_prompt_embeds", "negative_prompt_embeds_mask"} <= set(conditioning)
    generators = [torch.Generator().manual_seed(seed) for seed in range(2)]
    rollout = adapter.sample(conditioning, 3, 64, generators)
    assert rollout.latents.shape == (2, 4, 16)  # 2 x 2 tokens of 2 x 2 patches of 4 channels
    assert torch.equal(rollout.sigmas, pipeline.scheduler.timesteps / 1000)
    for index, row in enumerate(rows):
        expected = pipeline(
            image=_stock_image(family, row),
            prompt=PROMPTS[index],
            negative_prompt=" ",
            true_cfg_scale=4.0,
            height=64,
            width=64,
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(index),
            output_type="latent",
        ).images
        torch.testing.assert_close(rollout.latents[index : index + 1], expected, rtol=1e-5, atol=1e-6)


def test_bad_condition_images_are_refused_naming_the_fix(make_config):
    adapter = get_adapter(build_tiny_qwen_image_edit())
    with pytest.raises(ValueError, match=r"'make the sky red' has 2 condition images .* at most 1 per row"):
        adapter.encode_conditions(PROMPTS[:1], [[WIDE, SQUARE]], 64)
    with pytest.raises(
        ValueError, match=r"Qwen-Image-Edit edits or animates an image: every row needs .*'image' column"
    ):
        adapter.encode_conditions(PROMPTS, None, 64)
    dataset = Dataset.from_dict({"prompt": PROMPTS[:2], "image": [WIDE, SQUARE]})
    with pytest.raises(ValueError, match=r"resolution=48 .* multiple of 32"):
        DiffusionNFTTrainer(
            "tiny-qwen-image-edit", "jpeg_compressibility", args=make_config(resolution=48), train_dataset=dataset
        )


@pytest.mark.parametrize(
    ("model", "sources", "build"),
    [
        ("tiny-qwen-image-edit", [WIDE, SQUARE], build_tiny_qwen_image_edit),
        ("tiny-qwen-image-edit-plus", [[WIDE, SQUARE], [SQUARE]], build_tiny_qwen_image_edit_plus),
    ],
    ids=["edit", "edit-plus"],
)
def test_trains_from_an_image_column_its_rewards_see_the_sources_and_the_lora_reloads(
    make_config, tmp_path, model, sources, build
):
    prompts = ["make object number 3 brighter", "make object number 4 brighter"]
    dataset = Dataset.from_dict({"prompt": prompts, "image": sources})
    seen = []

    def brightness_of_the_edit(images, prompts, condition_images, **kwargs):
        seen.extend(zip(prompts, condition_images, strict=True))
        return [float(np.asarray(image, dtype=np.float32).mean()) / 255 for image in images]

    config = make_config(
        per_device_train_batch_size=2, num_generations=2, num_inference_steps=2, max_steps=1, learning_rate=3e-2
    )
    trainer = DiffusionNFTTrainer(model, brightness_of_the_edit, args=config, train_dataset=dataset)
    trainer.train()
    assert trainer.state.global_step == 1
    assert len(seen) >= 2
    for prompt, condition in seen:  # each sample's reward got its own row's source image(s), as the dataset holds them
        source = sources[prompts.index(prompt)]
        if isinstance(source, list):
            assert isinstance(condition, list) and len(condition) == len(source)
        else:
            condition, source = [condition], [source]
        for received, expected in zip(condition, source, strict=True):
            assert isinstance(received, Image.Image) and np.array_equal(np.asarray(received), np.asarray(expected))
    assert_the_saved_lora_reproduces_the_policy(
        trainer, build, tmp_path / "lora", image=sources[0], height=64, width=64, true_cfg_scale=1.0
    )
