"""The Hub model card of a DiffusionNFT run, made for diffusers: a LoRA (or denoiser) that `load_lora_weights` loads,
with the rewards it reached, the settings that produced it, sample images and the citations."""

import json
import os
import textwrap

import yaml
from PIL import Image

from .embedded import EMBEDDED_MODELS
from .media import save_gif


TAGS = ["trl", "trl-nft", "diffusion-nft", "lora", "diffusers"]
TRL_CITATION = textwrap.dedent("""\
    @software{vonwerra2020trl,
        title   = {{TRL: Transformers Reinforcement Learning}},
        author  = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan and Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallouédec, Quentin},
        license = {Apache-2.0},
        url     = {https://github.com/huggingface/trl},
        year    = {2020}
    }""")
#: The settings a reader needs to judge or reproduce a run, in the order shown.
KEY_SETTINGS = [
    "max_steps",
    "learning_rate",
    "num_generations",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "steps_per_generation",
    "num_inference_steps",
    "guidance_scale",
    "sampler",
    "resolution",
    "beta",
    "kl_coef",
    "loss_type",
    "scale_rewards",
    "advantage_clip",
    "old_policy_decay_schedule",
    "old_policy_decay_rate",
    "old_policy_decay_max",
    "ema_decay",
    "use_peft",
    "lora_r",
    "lora_alpha",
    "seed",
]


def final_reward_values(log_history: list[dict]) -> dict[str, float]:
    """The last logged value of each reward metric: `reward`, `rewards/<name>/mean` (training) and their `eval_`
    counterparts."""
    values = {}
    for entry in log_history:
        for key, value in entry.items():
            if key in ("reward", "eval_reward") or key.startswith(("rewards/", "eval_rewards/")):
                values[key] = value
    return values


def usage_code(
    base: str,
    weights: str,
    *,
    is_lora: bool = True,
    denoiser_name: str = "transformer",
    prompt: str = "a photo of a cat",
    call_kwargs: dict | None = None,
    condition_images: list[str] | None = None,
) -> str:
    """The model card's usage example, runnable as written: load the base model (`base`: a Hub id, a local folder, or
    an embedded model, which trl-nft builds), add the trained weights from `weights` (a Hub id or a folder), generate;
    for an image-conditioned model, from `condition_images` (files beside the card, relative to `weights`)."""
    device = 'device = "cuda" if torch.cuda.is_available() else "cpu"'
    if base in EMBEDDED_MODELS:  # no diffusers folder to load: trl-nft builds it, in float32
        imports = "import torch\n\nfrom trl_nft import load_pipeline"
        load = f'pipeline = load_pipeline("{base}").to(device)  # an embedded model, built by trl-nft'
    else:
        imports = "import torch\nfrom diffusers import DiffusionPipeline"
        dtype = 'torch.bfloat16 if device == "cuda" else torch.float32'
        load = f'pipeline = DiffusionPipeline.from_pretrained("{base}", torch_dtype={dtype}).to(device)'
    if is_lora:
        add = f'pipeline.load_lora_weights("{weights}")'
    else:
        add = (
            f'pipeline.{denoiser_name} = pipeline.{denoiser_name}.from_pretrained("{weights}", '
            f'subfolder="{denoiser_name}", torch_dtype=pipeline.dtype).to(device)'
        )
    # `prompt=` by name: not every pipeline takes it first (FLUX.2-klein's first argument is an image).
    arguments = [f"prompt={json.dumps(prompt, ensure_ascii=False)}"]
    if condition_images:  # the source image(s) of a sample of the run, saved beside the card
        imports += "\nfrom diffusers.utils import load_image"
        if os.path.isdir(weights):
            locate = [json.dumps(os.path.join(weights, path)) for path in condition_images]
        else:
            imports += "\nfrom huggingface_hub import hf_hub_download"
            locate = [f'hf_hub_download("{weights}", "{path}")' for path in condition_images]
        opened = [f"load_image({path})" for path in locate]
        add += f"\nsource = {opened[0] if len(opened) == 1 else '[' + ', '.join(opened) + ']'}"
        arguments.insert(0, "image=source")
    arguments += [f"{key}={value!r}" for key, value in (call_kwargs or {}).items()]
    # A video pipeline returns `frames` (one list of frames per video), an image pipeline `images`.
    output = (
        "video = pipeline({}).frames[0]" if "num_frames" in (call_kwargs or {}) else "image = pipeline({}).images[0]"
    )
    return f"{imports}\n\n{device}\n{load}\n{add}\n" + output.format(", ".join(arguments))


def write_model_card(
    output_dir: str,
    *,
    model_id: str,
    title: str | None = None,
    base_model: str | None,
    base_model_path: str | None = None,
    weights_location: str | None = None,
    pipeline_class: str,
    reward_names: list[str],
    rewards: dict[str, float],
    settings: dict,
    samples: list[tuple[Image.Image, str]],
    citation: str,
    sample_conditions: list | None = None,
    is_lora: bool = True,
    denoiser_name: str = "transformer",
    call_kwargs: dict | None = None,
    tags: list[str] | None = None,
) -> str:
    """Write `output_dir/README.md` (and the sample images to `output_dir/images/`); return the card's text.

    `model_id` names the model (the Hub id, or the folder's name) and `title` the heading (default: `model_id`);
    `base_model` is the base's Hub id or embedded name (None for a local folder, then `base_model_path`), and
    `weights_location` where the usage example loads the trained weights from (default: `model_id`). `call_kwargs` are
    the example's pipeline arguments (steps, guidance). `sample_conditions` are the samples' condition images (an
    image, or a list, each) for an image-conditioned model: saved beside them, shown, and used by the example."""
    os.makedirs(os.path.join(output_dir, "images"), exist_ok=True)
    sources = []  # per sample, the paths of its condition images
    for i, condition in enumerate(sample_conditions or []):
        condition = condition if isinstance(condition, list) else [condition]
        sources.append(
            [f"images/source_{i}{'' if len(condition) == 1 else f'_{k}'}.png" for k in range(len(condition))]
        )
        for image, path in zip(condition, sources[-1], strict=True):
            image.save(os.path.join(output_dir, path))
    widget = []
    for i, (image, prompt) in enumerate(samples):
        if isinstance(image, list):  # a video's frames: an animated GIF, which the Hub shows playing
            path = f"images/sample_{i}.gif"
            save_gif(image, os.path.join(output_dir, path))
        else:
            path = f"images/sample_{i}.png"
            image.save(os.path.join(output_dir, path))
        widget.append({"text": prompt, "output": {"url": path}})
    pipeline_tag = _pipeline_tag(bool(sources), any(isinstance(image, list) for image, _ in samples))
    metadata = {
        **({"base_model": base_model} if base_model else {}),
        "library_name": "diffusers",
        "pipeline_tag": pipeline_tag,
        "tags": list(dict.fromkeys([*TAGS, pipeline_tag, *(tags or []), *([] if is_lora else ["full-fine-tune"])])),
        **({"widget": widget} if widget else {}),
    }
    base = base_model or base_model_path or "<base model>"
    base_link = f"[{base}](https://huggingface.co/{base})" if base_model and base.count("/") == 1 else f"`{base}`"
    usage = usage_code(
        base,
        weights_location or model_id,
        is_lora=is_lora,
        denoiser_name=denoiser_name,
        prompt=samples[0][1] if samples else "a photo of a cat",
        call_kwargs=call_kwargs,
        condition_images=sources[0] if sources else None,
    )
    reward_rows = "\n".join(f"| `{key}` | {value:.4g} |" for key, value in rewards.items()) or "| - | - |"
    setting_rows = "\n".join(f"| `{key}` | `{settings[key]}` |" for key in KEY_SETTINGS if key in settings)
    sample_rows = "\n".join(
        f"| {' '.join(f'![source]({path})' for path in paths)} | ![{prompt}]({entry['output']['url']}) | {prompt} |"
        if sources
        else f"| ![{prompt}]({entry['output']['url']}) | {prompt} |"
        for entry, (_, prompt), paths in zip(widget, samples, sources or [None] * len(samples), strict=True)
    )
    sample_header = "| source | image | prompt |\n|---|---|---|" if sources else "| image | prompt |\n|---|---|"
    body = f"""
# {title or model_id}

A {"LoRA of" if is_lora else "fine-tuned denoiser of"} {base_link} trained with
**DiffusionNFT** (online reinforcement learning on the forward process) by [trl-nft](https://github.com/trl-nft/trl-nft),
against the reward{"s" if len(reward_names) > 1 else ""} {", ".join(f"`{name}`" for name in reward_names)}.
It is a diffusers {pipeline_class} {"LoRA" if is_lora else "component"}: load it as below.

## Usage

```python
{usage}
```

DiffusionNFT trains the model to sample without classifier-free guidance; the example samples as the run did.

## Rewards

Last logged values (`rewards/...`: training rollouts; `eval_...`: evaluation prompts with fixed noise).

| metric | value |
|---|---|
{reward_rows}

## Samples

Images of the last training rollout, with their prompts{" and the images they were conditioned on" if sources else ""}.

{sample_header}
{sample_rows}

## Training settings

| setting | value |
|---|---|
{setting_rows}

## Citations

```bibtex
{citation}
```

```bibtex
{TRL_CITATION}
```
"""
    card = f"---\n{yaml.safe_dump(metadata, sort_keys=False)}---\n{body}"
    with open(os.path.join(output_dir, "README.md"), "w") as file:
        file.write(card)
    return card


def _pipeline_tag(conditioned: bool, videos: bool) -> str:
    """The Hub's task of the trained model: what it generates, from what."""
    if videos:
        return "image-to-video" if conditioned else "text-to-video"
    return "image-to-image" if conditioned else "text-to-image"
