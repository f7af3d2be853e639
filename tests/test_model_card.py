"""The diffusers model card written by every save, and `push_to_hub` down to huggingface_hub's upload call."""

import ast
import contextlib

import huggingface_hub.hf_api
import numpy as np
import pytest
import torch
import yaml
from datasets import Dataset
from huggingface_hub import CommitInfo, HfApi, RepoUrl
from PIL import Image

from trl_nft import DiffusionNFTTrainer, build_tiny_sd3
from trl_nft.model_card import TAGS


def _trainer(make_config, prompts_dataset, **overrides):
    config = make_config(eval_strategy="steps", eval_steps=2, learning_rate=1e-2, **overrides)
    return DiffusionNFTTrainer(
        "tiny-sd3",
        "jpeg_incompressibility",
        args=config,
        train_dataset=prompts_dataset,
        eval_dataset=prompts_dataset.select(range(2)),
    )


def test_save_model_writes_a_diffusers_card_next_to_a_loadable_lora(make_config, prompts_dataset, tmp_path):
    trainer = _trainer(make_config, prompts_dataset)
    trainer.train()
    output_dir = tmp_path / "saved"
    trainer.save_model(str(output_dir))

    card = (output_dir / "README.md").read_text()
    _, front_matter, body = card.split("---\n", 2)
    metadata = yaml.safe_load(front_matter)
    assert metadata["library_name"] == "diffusers" and metadata["pipeline_tag"] == "text-to-image"
    assert metadata["base_model"] == "tiny-sd3"
    assert set(TAGS) <= set(metadata["tags"]) and "lora" in metadata["tags"]
    for entry in metadata["widget"]:  # the last rollout's images, one per prompt, with their prompts
        assert (output_dir / entry["output"]["url"]).is_file() and entry["text"] in trainer.last_rollout_samples[1]
    assert len({entry["text"] for entry in metadata["widget"]}) == len(metadata["widget"]) >= 1
    final = [entry for entry in trainer.state.log_history if "reward" in entry][-1]
    assert f"| `rewards/jpeg_incompressibility/mean` | {final['rewards/jpeg_incompressibility/mean']:.4g} |" in body
    assert "| `eval_reward` |" in body and "| `lora_r` | `4` |" in body
    # The settings the run used, where the config says "the family's default" or "the model's own" (None).
    settings = body.split("## Training settings", 1)[1].split("## Citations", 1)[0]
    assert "| `sampler` | `DPMSolverMultistepScheduler` |" in settings and "| `resolution` | `64` |" in settings
    assert "| `max_sequence_length` | `128` |" in settings and "| `fine_tuning` | `LoRA` |" in settings
    assert "None" not in settings
    assert "exponential moving average of the trained weights (decay up to 0.9)" in body
    assert f'pipeline.load_lora_weights("{output_dir}")' in body
    assert "zheng2026diffusionnft" in body and "vonwerra2020trl" in body

    # The folder is exactly what diffusers loads.
    fresh = build_tiny_sd3()
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(str(output_dir))
    image = fresh("a photo", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert np.isfinite(image.images).all()


def test_push_to_hub_uploads_the_card_and_the_lora(make_config, prompts_dataset, tmp_path, monkeypatch):
    commits = []

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, *, commit_message, **kwargs):
        commits.append((repo_id, commit_message, sorted(op.path_in_repo for op in operations)))
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/1",
            commit_message=commit_message,
            commit_description="",
            oid="1" * 40,
        )

    validated = []

    def validate_yaml(self, content, **kwargs):  # the Hub checks the card's metadata: here, that it parses
        validated.append(yaml.safe_load(content.split("---\n")[1]))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    # upload_folder's single-commit path (the one without hf_xet), which ends in `create_commit`.
    monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)
    monkeypatch.setattr(HfApi, "_validate_yaml", validate_yaml)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    trainer = _trainer(
        make_config, prompts_dataset, push_to_hub=True, hub_model_id="someone/tiny-sd3-nft", hub_strategy="end"
    )
    trainer.train()
    trainer.push_to_hub(commit_message="End of training")

    assert len(commits) == 1 and validated[0]["library_name"] == "diffusers"
    repo_id, message, files = commits[0]
    assert (repo_id, message) == ("someone/tiny-sd3-nft", "End of training")
    samples = [path for path in files if path.startswith("images/")]
    assert files == sorted(["README.md", "pytorch_lora_weights.safetensors", "training_args.bin", *samples])
    assert samples and all(path.endswith(".png") for path in samples)
    card = (tmp_path / "run" / "README.md").read_text()
    assert 'pipeline.load_lora_weights("someone/tiny-sd3-nft")' in card


def test_a_fully_fine_tuned_card_says_how_to_load_the_denoiser(make_config, prompts_dataset, tmp_path):
    trainer = _trainer(make_config, prompts_dataset, use_peft=False, max_steps=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "full"))
    card = (tmp_path / "full" / "README.md").read_text()
    tags = yaml.safe_load(card.split("---\n")[1])["tags"]
    assert "full-fine-tune" in tags and "lora" not in tags
    assert "| `fine_tuning` | `full` |" in card and "lora_r" not in card
    assert f'from_pretrained("{tmp_path / "full"}", subfolder="transformer"' in card
    _run_usage_example(card, tmp_path)


def _usage_example(card: str) -> str:
    return card.split("```python\n", 1)[1].split("```", 1)[0]


def _run_usage_example(card: str, cwd, **call) -> dict:
    """Run the card's Python example exactly as written (from `cwd`), offline, and return its variables; `call` adds
    keyword arguments (Python source) to its pipeline call."""
    tree = ast.parse(_usage_example(card))
    for node in ast.walk(tree.body[-1]):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "pipeline":
            node.keywords += [ast.keyword(key, ast.parse(value, mode="eval").body) for key, value in call.items()]
    namespace = {}
    with contextlib.chdir(cwd):
        exec(compile(ast.fix_missing_locations(tree), "model_card_usage", "exec"), namespace)
    return namespace


def _evaluation_sample(trainer: DiffusionNFTTrainer, prompt: str, condition, seed: int) -> np.ndarray:
    """What the run's evaluation samples for `prompt` (and its `condition` image(s), or None) from the noise of
    `seed`: the trained weights' EMA, the evaluation sampler and steps, through the model adapter (the trainer's own
    sampling path), as `[H, W, 3]` (a video: `[F, H, W, 3]`) in [0, 1]."""
    args, adapter = trainer.args, trainer.adapter
    conditions = None if condition is None else [condition if isinstance(condition, list) else [condition]]
    with torch.no_grad(), trainer.policies.evaluation_weights(), trainer._evaluation_sampler():
        adapter.denoiser.eval()
        conditioning = adapter.encode_conditions([prompt], conditions, trainer.resolution)
        steps = args.eval_num_inference_steps or args.num_inference_steps
        rollout = adapter.sample(conditioning, steps, trainer.resolution, [torch.Generator().manual_seed(seed)])
        return adapter.decode(rollout.latents)[0].movedim(-3, -1).numpy()


EDITS = "edits"  # a dataset of prompts with source images


@pytest.mark.parametrize(
    ("base", "overrides"),
    [
        ("tiny-sd3", {}),
        ("tiny-sd3", {"eval_sampler": "FlowMatchEulerDiscreteScheduler", "eval_num_inference_steps": 3}),
        ("tiny-sd", {}),
        ("tiny-sdxl", {}),
        ("tiny-flux", {}),
        ("tiny-qwen-image", {}),
        ("tiny-flux2-klein", {}),
        ("tiny-z-image", {}),
        ("tiny-sana", {}),
        ("tiny-wan", {"num_frames": 5}),
        ("tiny-flux-kontext", {EDITS: True}),
        ("tiny-qwen-image-edit", {EDITS: True}),
        ("tiny-wan-i2v", {EDITS: True, "num_frames": 5}),
        ("local folder", {}),
    ],
    ids=lambda value: value if isinstance(value, str) else "-".join(value) or None,
)
def test_the_usage_example_runs_as_written_and_samples_as_the_run_evaluated(
    make_config, prompts_dataset, tmp_path, monkeypatch, base, overrides
):
    # For an embedded base the example builds it with trl-nft; a local folder is loaded from its path. Every family's
    # pipeline takes the example's arguments (its guidance argument included), and with the same noise the example
    # samples what the run's evaluation samples: its weights (the EMA), sampler, steps, size, guidance and prompt
    # length. (Before it set the run's sampler and prompt length, the example's images differed from the evaluation's
    # by up to 73 % of the pixel range on SD1.x, 17-18 % on SD3 and SDXL, 1-4 % on the others; SANA's failed.)
    monkeypatch.chdir(tmp_path)
    model = base
    if base == "local folder":
        build_tiny_sd3().save_pretrained("base")
        model = "base"
    overrides = dict(overrides)
    if overrides.pop(EDITS, False):
        sources = [Image.new("RGB", (64, 64), (40 * (i % 6), 120, 200 - 10 * i)) for i in range(len(prompts_dataset))]
        prompts_dataset = Dataset.from_dict({"prompt": prompts_dataset["prompt"], "image": sources})
    config = make_config(max_steps=1, num_inference_steps=2, learning_rate=1e-2, **overrides)
    trainer = DiffusionNFTTrainer(model, "jpeg_incompressibility", args=config, train_dataset=prompts_dataset)
    trainer.train()
    trainer.save_model("lora")  # a relative folder: the example loads it from where the run was started
    card = (tmp_path / "lora" / "README.md").read_text()
    assert (f'load_pipeline("{base}")' in card) == (base != "local folder")
    namespace = _run_usage_example(card, tmp_path)
    assert isinstance(namespace["image"], Image.Image) if "image" in namespace else len(namespace["video"]) > 1

    sampled = _run_usage_example(card, tmp_path, generator="torch.Generator().manual_seed(3)", output_type='"np"')
    example = np.asarray(sampled["image"] if "image" in sampled else sampled["video"])
    conditions = trainer.last_rollout_conditions
    evaluation = _evaluation_sample(trainer, trainer.last_rollout_samples[1][0], conditions and conditions[0], seed=3)
    np.testing.assert_allclose(example, evaluation, atol=1e-4)
