"""The Hub model card of a DiffusionNFT run, made for diffusers: a LoRA (or denoiser) that `load_lora_weights` loads,
with the rewards it reached, the settings that produced it, sample images and the citations."""

import inspect
import json
import os
import textwrap

import yaml
from diffusers import DiffusionPipeline, SchedulerMixin
from PIL import Image

from .conditions import fingerprint
from .embedded import EMBEDDED_MODELS
from .media import save_gif
from .model_names import resolve_model_name


TAGS = ["trl", "trl-nft", "diffusion-nft", "diffusers"]  # and "lora" or "full-fine-tune"
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
    "sampler_kwargs",
    "eval_sampler",
    "eval_num_inference_steps",
    "resolution",
    "num_frames",
    "max_sequence_length",
    "nft_beta",
    "nft_beta",
    "kl_coef",
    "loss_type",
    "scale_rewards",
    "advantage_clip",
    "old_policy_decay_schedule",
    "old_policy_decay_rate",
    "old_policy_decay_max",
    "ema_decay",
    "fine_tuning",
    "lora_r",
    "lora_alpha",
    "lora_target_modules",
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
    scheduler: tuple[str, dict] | None = None,
    call_code: tuple[list[str], dict[str, str]] | None = None,
) -> str:
    """The model card's usage example, runnable as written: load the base model (`base`: a Hub id, a local folder, or
    an embedded model, which trl-nft builds), add the trained weights from `weights` (a Hub id or a folder), set the
    run's sampler (`scheduler`: a diffusers scheduler class name and its settings over the model's own scheduler, see
    `sampler_setup`), generate with `call_kwargs` (values) and `call_code` (imports and arguments as source, from the
    adapter's `pipeline_call_code`); for an image-conditioned model, from `condition_images` (files beside the card,
    relative to `weights`)."""
    device = 'device = "cuda" if torch.cuda.is_available() else "cpu"'
    imports, from_diffusers, own_imports = ["import torch"], [], []
    if base in EMBEDDED_MODELS:  # no diffusers folder to load: trl-nft builds it, in float32
        own_imports.append("from trl_nft import load_pipeline")
        load = f'pipeline = load_pipeline("{base}").to(device)  # an embedded model, built by trl-nft'
    else:
        from_diffusers.append("DiffusionPipeline")
        dtype = 'torch.bfloat16 if device == "cuda" else torch.float32'
        load = f'pipeline = DiffusionPipeline.from_pretrained("{base}", torch_dtype={dtype}).to(device)'
    if is_lora:
        steps = [f'pipeline.load_lora_weights("{weights}")']
    else:
        steps = [
            f'pipeline.{denoiser_name} = pipeline.{denoiser_name}.from_pretrained("{weights}", '
            f'subfolder="{denoiser_name}", torch_dtype=pipeline.dtype).to(device)'
        ]
    if scheduler is not None:  # the run's sampler, switched to as diffusers' docs switch schedulers
        class_name, settings = scheduler
        from_diffusers.append(class_name)
        options = ["pipeline.scheduler.config", *(f"{key}={_literal(value)}" for key, value in settings.items())]
        steps.append(_call(f"pipeline.scheduler = {class_name}.from_config", options))
    # `prompt=` by name: not every pipeline takes it first (FLUX.2-klein's first argument is an image).
    arguments = [f"prompt={json.dumps(prompt, ensure_ascii=False)}"]
    if condition_images:  # the source image(s) of a sample of the run, saved beside the card
        imports.append("from diffusers.utils import load_image")
        if os.path.isdir(weights):
            locate = [json.dumps(os.path.join(weights, path)) for path in condition_images]
        else:
            imports.append("from huggingface_hub import hf_hub_download")
            locate = [f'hf_hub_download("{weights}", "{path}")' for path in condition_images]
        opened = [f"load_image({path})" for path in locate]
        steps.append(f"source = {opened[0] if len(opened) == 1 else '[' + ', '.join(opened) + ']'}")
        arguments.insert(0, "image=source")
    arguments += [f"{key}={_literal(value)}" for key, value in (call_kwargs or {}).items()]
    code_imports, code_arguments = call_code or ([], {})
    imports += code_imports
    arguments += [f"{key}={source}" for key, source in code_arguments.items()]
    # A video pipeline returns `frames` (one list of frames per video), an image pipeline `images`.
    output = (
        ("video = pipeline", ".frames[0]")
        if "num_frames" in (call_kwargs or {})
        else ("image = pipeline", ".images[0]")
    )
    if from_diffusers:
        imports.insert(1, f"from diffusers import {', '.join(from_diffusers)}")
    header = "\n".join(imports) + ("\n\n" + "\n".join(own_imports) if own_imports else "")
    return "\n".join([header, "", device, load, *steps, _call(output[0], arguments) + output[1]])


def _literal(value) -> str:
    """`value` as Python source, strings in double quotes (as the rest of the example)."""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)


def _call(function: str, arguments: list[str], width: int = 119) -> str:
    """`function(arguments)` on one line if it fits in `width`, else with its arguments on an indented line of
    their own."""
    one_line = f"{function}({', '.join(arguments)})"
    return one_line if len(one_line) <= width else f"{function}(\n    {', '.join(arguments)}\n)"


def sampler_setup(scheduler: SchedulerMixin, model_scheduler: SchedulerMixin) -> tuple[str, dict] | None:
    """How the usage example switches a pipeline from `model_scheduler` (the model's own) to `scheduler`: its class
    name and the settings in which it differs from what that class would take from the model's config, so that
    `X.from_config(pipeline.scheduler.config, **settings)` rebuilds it exactly; None when it is the model's own."""
    scheduler_class = type(scheduler)
    parameters = inspect.signature(scheduler_class.__init__).parameters
    model_config = model_scheduler.config
    settings = {
        key: value
        for key, value in scheduler.config.items()
        if key in parameters and model_config.get(key, parameters[key].default) != value
    }
    if scheduler_class is type(model_scheduler) and not settings:
        return None
    return scheduler_class.__name__, settings


def base_model_of(model: str | DiffusionPipeline, pipeline: DiffusionPipeline) -> tuple[str | None, str | None]:
    """The base model for the model card: its Hub id (or embedded name), else the local folder it was loaded from."""
    name = resolve_model_name(model) if isinstance(model, str) else getattr(pipeline, "name_or_path", None)
    if not name:
        return None, None
    if name not in EMBEDDED_MODELS and os.path.isdir(name):
        return None, os.path.abspath(name)
    return (name, None) if name in EMBEDDED_MODELS or name.count("/") == 1 else (None, None)


def write_trainer_model_card(trainer, output_dir: str, model_name: str | None = None, tags=None) -> str | None:
    """Write the model card of `trainer`'s run (a `DiffusionNFTTrainer`) to `output_dir` from the values the run used:
    its resolved sampler, resolution, guidance and prompt length, LoRA or full weights, the EMA; up to four samples of
    its last rollout, one per prompt. A trainer that has sampled nothing (a resumed run with no step left to train)
    leaves a card already there as it is, and returns None."""
    if trainer.last_rollout_samples is None and os.path.isfile(os.path.join(output_dir, "README.md")):
        return None
    args, adapter, pipeline = trainer.args, trainer.adapter, trainer.pipeline
    images, prompts, _ = trainer.last_rollout_samples or ([], [], [])
    conditions = trainer.last_rollout_conditions if images else None
    first_of_each_group = {}  # one sample per prompt (and condition): the first image of each group
    for i, prompt in enumerate(prompts):
        condition = None if conditions is None else conditions[i]
        key = prompt if condition is None else (prompt, fingerprint(_as_list(condition)))
        first_of_each_group.setdefault(key, i)
    shown = list(first_of_each_group.values())[:4]
    # The usage example samples as the run evaluated: its sampler and steps, size (and frames), guidance and prompt
    # length (where the family's pipeline takes one).
    with trainer._evaluation_sampler():
        evaluation_scheduler = pipeline.scheduler
    steps = args.eval_num_inference_steps or args.num_inference_steps
    call_kwargs = {
        "num_inference_steps": steps,
        **adapter.pipeline_size_arguments(trainer.resolution),
        **adapter.pipeline_guidance(),
    }
    call_code = adapter.pipeline_call_code(steps)
    takes_prompt_length = "max_sequence_length" in inspect.signature(type(pipeline).__call__).parameters
    lora = trainer.policies.lora_config
    resolved = {  # what the run used, where the config says None ("the model's own", "the family's default")
        "sampler": type(pipeline.scheduler).__name__,
        "eval_sampler": type(evaluation_scheduler).__name__ if args.eval_sampler is not None else None,
        "resolution": trainer.resolution,
        "guidance_scale": adapter.guidance_scale,
        "num_frames": adapter.num_frames,
        "max_sequence_length": adapter.max_sequence_length if takes_prompt_length else None,
        "fine_tuning": "LoRA" if trainer.policies.use_lora else "full",
        "lora_r": lora.r if lora else None,
        "lora_alpha": lora.lora_alpha if lora else None,
        "lora_target_modules": _target_modules(lora.target_modules) if lora else None,
    }
    settings = {key: value for key, value in {**args.to_dict(), **resolved}.items() if value is not None}
    return write_model_card(
        output_dir,
        model_id=args.hub_model_id or os.path.basename(os.path.normpath(output_dir)),
        title=model_name,
        base_model=trainer.base_model_id,
        base_model_path=trainer.base_model_path,
        weights_location=args.hub_model_id or os.path.normpath(output_dir),
        pipeline_class=type(pipeline).__name__,
        reward_names=trainer.reward_func_names,
        rewards=final_reward_values(trainer.state.log_history),
        settings=settings,
        samples=[(images[i], prompts[i]) for i in shown],
        sample_conditions=None if conditions is None else [conditions[i] for i in shown],
        citation=trainer._paper["citation"],
        is_lora=trainer.policies.use_lora,
        denoiser_name=adapter.denoiser_name,
        call_kwargs=call_kwargs,
        call_code=call_code,
        scheduler=sampler_setup(evaluation_scheduler, adapter.model_scheduler),
        ema_decay=args.ema_decay,
        tags=tags,
    )


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
    call_code: tuple[list[str], dict[str, str]] | None = None,
    scheduler: tuple[str, dict] | None = None,
    ema_decay: float = 0.0,
    tags: list[str] | None = None,
) -> str:
    """Write `output_dir/README.md` (and the sample images to `output_dir/images/`); return the card's text.

    `model_id` names the model (the Hub id, or the folder's name) and `title` the heading (default: `model_id`);
    `base_model` is the base's Hub id or embedded name (None for a local folder, then `base_model_path`), and
    `weights_location` where the usage example loads the trained weights from (default: `model_id`). `call_kwargs` are
    the example's pipeline arguments (steps, size, guidance, prompt length), `call_code` the family's others (see
    `usage_code`) and `scheduler` its sampler (`sampler_setup`). `ema_decay` > 0 says that the weights are the EMA of the trained ones. `sample_conditions` are
    the samples' condition images (an image, or a list, each) for an image-conditioned model: saved beside them,
    shown, and used by the example."""
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
        "tags": list(dict.fromkeys([*TAGS, "lora" if is_lora else "full-fine-tune", pipeline_tag, *(tags or [])])),
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
        scheduler=scheduler,
        call_code=call_code,
    )
    weights = (
        f"the exponential moving average of the trained weights (decay up to {ema_decay}), which the run evaluated"
        if ema_decay > 0
        else "the trained weights of its last step"
    )
    reproduced = [
        "sampler",
        "steps",
        "size",
        "guidance",
        *(["prompt length"] if "max_sequence_length" in (call_code or ([], {}))[1] else []),
    ]
    reward_rows = "\n".join(f"| `{key}` | {value:.4g} |" for key, value in rewards.items()) or "| - | - |"
    setting_rows = "\n".join(f"| `{key}` | `{settings[key]}` |" for key in KEY_SETTINGS if key in settings)
    sample_rows = "\n".join(
        f"| {' '.join(f'![source]({path})' for path in paths)} | ![{prompt}]({entry['output']['url']}) | {prompt} |"
        if sources
        else f"| ![{prompt}]({entry['output']['url']}) | {prompt} |"
        for entry, (_, prompt), paths in zip(widget, samples, sources or [None] * len(samples), strict=True)
    )
    sample_header = "| source | image | prompt |\n|---|---|---|" if sources else "| image | prompt |\n|---|---|"
    samples_section = f"{sample_header}\n{sample_rows}" if samples else "None: no rollout ran before this save."
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

The weights are {weights}.
The example samples as the run's evaluation did: the same {", ".join(reproduced[:-1])} and {reproduced[-1]}.

## Rewards

Last logged values (`rewards/...`: training rollouts; `eval_...`: evaluation prompts with fixed noise).

| metric | value |
|---|---|
{reward_rows}

## Samples

Images of the last training rollout, with their prompts{" and the images they were conditioned on" if sources else ""}.

{samples_section}

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


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _target_modules(targets) -> list[str] | str | None:
    """PEFT's `target_modules` as the card shows them: a sorted list (PEFT keeps a set), or a regular expression."""
    return sorted(targets) if isinstance(targets, set | list | tuple) else targets
