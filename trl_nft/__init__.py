"""trl-nft: DiffusionNFT online reinforcement learning for diffusion and flow models, in the TRL style.

The public names below are imported on first use (as transformers and diffusers do), so that `import trl_nft` and
`trl nft --help` or a bad `trl nft` flag cost no torch, diffusers or transformers import. Submodules load the same
way: `trl_nft.rewards` registers the built-in rewards when it is first imported."""

import importlib


__version__ = "0.1.0.dev0"

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "DiffusionNFTTrainer": "nft_trainer",
    "NFTConfig": "nft_config",
    "RewardModel": "rewards",
    "build_tiny_sd": "embedded",
    "build_tiny_sd3": "embedded",
    "build_tiny_sdxl": "embedded",
    "drawbench_prompts": "prompts",
    "geneval_prompts": "prompts",
    "get_adapter": "models",
    "get_reward": "rewards",
    "list_rewards": "rewards",
    "load_geneval_metadata": "prompts",
    "load_pipeline": "models",
    "ocr_prompts": "prompts",
    "pickapic_prompts": "prompts",
    "register_reward": "rewards",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name.startswith("__"):  # probes such as `__wrapped__`
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    else:  # a submodule, e.g. `trl_nft.rewards` after a bare `import trl_nft`
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
