"""Fine-tune a text-to-image model with DiffusionNFT from the command line.

    python examples/nft.py --model tiny-sd3 --reward jpeg_incompressibility --output_dir outputs/tiny-sd3-nft
    python examples/nft.py --config examples/configs/tiny_sd3.yaml --max_steps 10

Every `NFTConfig` field is a flag (`--help` lists them); `--config file.yaml` sets defaults that flags override. The
run saves the LoRA (loadable with `pipeline.load_lora_weights(output_dir)`) and `samples.png`: the evaluation prompts
before (top row) and after (bottom row) training, with the same noise.
"""

import os
from dataclasses import dataclass, field

import torch
from datasets import Dataset, load_dataset
from PIL import Image
from trl import TrlParser

from trl_nft import DiffusionNFTTrainer, NFTConfig


SUBJECTS = ["cat", "dog", "house", "tree", "car", "boat", "flower", "mountain"]
STYLES = ["a photo of a", "a painting of a", "a sketch of a", "a close-up of a"]


@dataclass
class ScriptArguments:
    model: str = field(default="tiny-sd3", metadata={"help": "Hub id, local folder, or 'tiny-sd3' (offline)."})
    reward: list[str] = field(
        default_factory=lambda: ["jpeg_incompressibility"], metadata={"help": "Registered reward name(s)."}
    )
    dataset: str | None = field(
        default=None, metadata={"help": "Dataset with a 'prompt' column (Hub id or local file); default: 32 prompts."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of --dataset to train on."})
    num_eval_prompts: int = field(default=4, metadata={"help": "Prompts shown in samples.png."})


def image_grid(rows: list[list[Image.Image]]) -> Image.Image:
    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * len(rows[0]), height * len(rows)))
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid.paste(image, (j * width, i * height))
    return grid


def sample(trainer: DiffusionNFTTrainer, prompts: list[str]) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(trainer.args.seed)
    return trainer.pipeline(
        prompts,
        num_inference_steps=trainer.args.num_inference_steps,
        guidance_scale=trainer.args.guidance_scale,
        height=trainer.resolution,
        width=trainer.resolution,
        generator=generator,
        max_sequence_length=trainer.args.max_sequence_length,
    ).images


def main(script_args: ScriptArguments, training_args: NFTConfig) -> None:
    if script_args.dataset is None:
        dataset = Dataset.from_dict({"prompt": [f"{style} {subject}" for style in STYLES for subject in SUBJECTS]})
    else:
        dataset = load_dataset(script_args.dataset, split=script_args.dataset_split)
    trainer = DiffusionNFTTrainer(
        model=script_args.model,
        reward_funcs=script_args.reward,
        args=training_args,
        train_dataset=dataset,
    )
    eval_prompts = dataset["prompt"][: script_args.num_eval_prompts]
    before = sample(trainer, eval_prompts)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        path = os.path.join(training_args.output_dir, "samples.png")
        image_grid([before, sample(trainer, eval_prompts)]).save(path)
        print(f"Saved the LoRA and {path}")


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, NFTConfig))
    main(*parser.parse_args_and_config())
