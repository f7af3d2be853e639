"""trl-nft: DiffusionNFT online reinforcement learning for diffusion and flow models, in the TRL style."""

__version__ = "0.1.0.dev0"

from .embedded import build_tiny_sd, build_tiny_sd3, build_tiny_sdxl  # noqa: E402
from .models import get_adapter, load_pipeline  # noqa: E402
from .nft_config import NFTConfig  # noqa: E402
from .nft_trainer import DiffusionNFTTrainer  # noqa: E402
from .prompts import drawbench_prompts, geneval_prompts, load_geneval_metadata, ocr_prompts, pickapic_prompts  # noqa: E402
from .rewards import RewardModel, get_reward, list_rewards, register_reward  # noqa: E402


__all__ = [
    "DiffusionNFTTrainer",
    "NFTConfig",
    "RewardModel",
    "build_tiny_sd",
    "build_tiny_sd3",
    "build_tiny_sdxl",
    "drawbench_prompts",
    "geneval_prompts",
    "get_adapter",
    "get_reward",
    "list_rewards",
    "load_geneval_metadata",
    "load_pipeline",
    "ocr_prompts",
    "pickapic_prompts",
    "register_reward",
]
