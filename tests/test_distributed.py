"""Two processes (torchrun, CPU, gloo): a group spans both, rewards are normalised over all of them, and DDP keeps
the trained adapters identical."""

import json
import subprocess
import sys
import textwrap

import torch

from trl_nft.objective import group_advantages, optimality_probability


SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from datasets import Dataset
    from trl_nft import DiffusionNFTTrainer, NFTConfig
    from trl_nft.rewards import get_reward

    jpeg = get_reward("jpeg_incompressibility")
    records = {"prompts": [], "rewards": [], "optimality": []}

    def reward(images, prompts, **kwargs):
        values = jpeg(images, prompts)
        records["prompts"].append(list(prompts))
        records["rewards"].append(values)
        return values

    dataset = Dataset.from_dict({"prompt": [f"prompt {i}" for i in range(8)]})
    args = NFTConfig(
        output_dir=sys.argv[1], per_device_train_batch_size=4, num_generations=8, num_inference_steps=3,
        lora_r=4, lora_alpha=8, max_steps=2, learning_rate=1e-2, save_strategy="no", report_to="none",
        disable_tqdm=True, use_cpu=True, ddp_backend="gloo",
    )
    trainer = DiffusionNFTTrainer("tiny-sd3", reward, args=args, train_dataset=dataset)
    generate = trainer._generate_and_score

    def recording(rows):
        output = generate(rows)
        records["optimality"].append(output["optimality"].tolist())
        return output

    trainer._generate_and_score = recording
    trainer.train()
    records["world_size"] = trainer.accelerator.num_processes
    records["trained"] = [p.detach().sum().item() for p in trainer.policies.trained]
    with open(f"{sys.argv[1]}/rank{trainer.accelerator.process_index}.json", "w") as f:
        json.dump(records, f)
    trainer.accelerator.wait_for_everyone()  # no rank tears down the group while another still uses it
    torch.distributed.destroy_process_group()  # a clean exit: no gloo thread left running at teardown
    """
)


def test_groups_span_processes_and_adapters_stay_in_sync(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
    result = subprocess.run(command + [str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert [rank["world_size"] for rank in ranks] == [2, 2]

    # Skip the construction-time probe (first call); then one rollout per step.
    for step in range(2):
        prompts = ranks[0]["prompts"][1 + step] + ranks[1]["prompts"][1 + step]
        assert len(set(prompts)) == 1, "one group of 8 images of one prompt, split 4 + 4 across the processes"
        rewards = torch.tensor(ranks[0]["rewards"][1 + step] + ranks[1]["rewards"][1 + step])
        expected = optimality_probability(group_advantages(rewards, 8, "batch"))
        optimality = torch.tensor(ranks[0]["optimality"][step] + ranks[1]["optimality"][step])
        torch.testing.assert_close(optimality, expected)

    assert ranks[0]["trained"] == ranks[1]["trained"]
