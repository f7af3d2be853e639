"""The `trl-nft` command line. Each subcommand has a function that adds its parser (`_add_<command>_parser`) and one
that runs it; register a new subcommand in `build_parser`.

    trl-nft reward-server --reward hpsv2 --reward clip_score --reward_kwargs 'clip_score={"batch_size": 8}'
"""

import argparse
import importlib
import importlib.resources as resources
import json
import logging
import os
import sys

import torch

from .rewards import RewardModel, get_reward
from .rewards.remote import TOKEN_ENV_VAR


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trl-nft", description="DiffusionNFT online RL for diffusion models.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_nft_parser(subparsers)
    _add_reward_server_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["nft"]:  # everything after `nft` belongs to the training script's parser
        return nft(argv[1:])
    args = build_parser().parse_args(argv)
    return args.run(args) or 0


# ------------------------------------------------------------------------------------------------------- nft


def _add_nft_parser(subparsers) -> None:
    # The training script's own parser (TRL's: dataclasses -> flags, --config YAML) reads everything after `nft`.
    # (`main` hands it the arguments directly; this entry is for `trl-nft --help`.)
    subparsers.add_parser(
        "nft", help="train a diffusion model with DiffusionNFT (`trl-nft nft --help` lists every flag)", add_help=False
    )


def nft(argv: list[str]) -> int:
    """Launch `trl_nft/scripts/nft.py` with `accelerate launch`, as TRL launches its training scripts: flags that
    the script does not know (`--num_processes`, `--accelerate_config NAME_OR_FILE`, ...) go to accelerate."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    from .scripts import nft as script

    argv = script.with_model_preset(script.merge_repeated_flags(argv))
    parser = script.make_parser(prog="trl nft")
    try:  # parsed here first, so that bad flags and --help answer at once, before accelerate starts
        script_args, training_args, config_remaining, cli_remaining = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except ValueError as error:
        raise SystemExit(f"trl nft: {error}") from error
    launch_args = _accelerate_config_file(config_remaining + cli_remaining)
    script_argv = _without_subsequence(argv, cli_remaining)
    launch_command(launch_command_parser().parse_args([*launch_args, script.__file__, *script_argv]))
    return 0


def _accelerate_config_file(launch_args: list[str]) -> list[str]:
    """`--accelerate_config NAME_OR_FILE` -> accelerate's `--config_file`: a file, or a config shipped with TRL
    (`zero2`, `fsdp2`, `multi_gpu`, ...)."""
    if "--accelerate_config" not in launch_args:
        return launch_args
    index = launch_args.index("--accelerate_config")
    if index + 1 == len(launch_args):
        raise SystemExit("trl nft: --accelerate_config needs a value (a config file or a TRL config name).")
    name = launch_args[index + 1]
    path = name if os.path.isfile(name) else str(resources.files("trl.accelerate_configs").joinpath(f"{name}.yaml"))
    if not os.path.isfile(path):
        raise SystemExit(f"trl nft: --accelerate_config {name!r} is neither a file nor one of TRL's configs.")
    return ["--config_file", path, *launch_args[:index], *launch_args[index + 2 :]]


def _without_subsequence(items: list[str], subsequence: list[str]) -> list[str]:
    """`items` without the elements of `subsequence`, matched in order."""
    remaining, pending = [], iter(subsequence)
    current = next(pending, None)
    for item in items:
        if current is not None and item == current:
            current = next(pending, None)
        else:
            remaining.append(item)
    return remaining


# ---------------------------------------------------------------------------------------------- reward-server


def _reward_kwargs(text: str) -> tuple[str, dict]:
    """`NAME=JSON` -> (NAME, the JSON object)."""
    name, sep, options = text.partition("=")
    try:
        options = json.loads(options) if sep else None
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: the options are not valid JSON ({error}).") from error
    if not name or not isinstance(options, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME='{{\"option\": value, ...}}' (a JSON object).")
    return name, options


def _add_reward_server_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "reward-server",
        help="serve reward functions over HTTP, for the `remote` reward",
        description=(
            "Serve registered rewards over HTTP (JSON, never pickle) so that training can score images with "
            "`get_reward('remote', url=..., reward=NAME)`. GET /health needs no token; POST /score does when one "
            "is set."
        ),
    )
    parser.add_argument(
        "--reward", action="append", required=True, metavar="NAME", help="a registered reward to serve (repeatable)"
    )
    parser.add_argument(
        "--reward_kwargs",
        action="append",
        type=_reward_kwargs,
        default=[],
        metavar="NAME=JSON",
        help="""options of one reward as a JSON object, e.g. 'clip_score={"checkpoint": "/ckpt/clip"}' (repeatable)""",
    )
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="a module to import first, so that the rewards it registers can be served (repeatable)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV_VAR),
        help=f"require 'Authorization: Bearer TOKEN' on /score (default: ${TOKEN_ENV_VAR}; none if unset)",
    )
    parser.add_argument("--batch_size", type=int, default=32, help="most images per call to a reward")
    parser.add_argument(
        "--device", default=None, help="device of model-backed rewards (default: cuda when available, else cpu)"
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype of model-backed rewards")
    parser.set_defaults(run=reward_server)


def reward_server(args: argparse.Namespace) -> None:
    from .rewards.server import serve

    for module in args.imports:
        importlib.import_module(module)
    kwargs = dict(args.reward_kwargs)
    unserved = kwargs.keys() - set(args.reward)
    if unserved:
        raise SystemExit(f"trl-nft reward-server: --reward_kwargs for {sorted(unserved)}, which no --reward serves.")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rewards = {}
    for name in dict.fromkeys(args.reward):  # each name once, in order
        try:
            reward = get_reward(name, **kwargs.get(name, {}))
        except (ValueError, TypeError) as error:
            raise SystemExit(f"trl-nft reward-server: {error}") from error
        if isinstance(reward, RewardModel):
            reward.to(device, DTYPES[args.dtype])
        rewards[name] = reward
    serve(rewards, host=args.host, port=args.port, token=args.token or None, max_batch_size=args.batch_size)


if __name__ == "__main__":
    main()
