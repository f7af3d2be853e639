"""trl-nft: DiffusionNFT online reinforcement learning for diffusion and flow models, in the TRL style."""

__version__ = "0.1.0.dev0"

from .models import build_tiny_sd, build_tiny_sd3, get_adapter, load_pipeline  # noqa: E402
from .nft_config import NFTConfig  # noqa: E402
from .nft_trainer import DiffusionNFTTrainer  # noqa: E402
from .rewards import get_reward, list_rewards, register_reward  # noqa: E402


__all__ = [
    "DiffusionNFTTrainer",
    "NFTConfig",
    "build_tiny_sd",
    "build_tiny_sd3",
    "get_adapter",
    "get_reward",
    "list_rewards",
    "load_pipeline",
    "register_reward",
]
