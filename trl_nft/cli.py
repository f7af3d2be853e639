"""The `trl-nft` command line. Each subcommand has a function that adds its parser (`_add_<command>_parser`) and one
that runs it; register a new subcommand in `build_parser`.

    trl-nft reward-server --reward hpsv2 --reward clip_score --reward_kwargs 'clip_score={"batch_size": 8}'
"""

import argparse
import importlib
import json
import logging
import os

import torch

from .rewards import RewardModel, get_reward
from .rewards.remote import TOKEN_ENV_VAR


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trl-nft", description="DiffusionNFT online RL for diffusion models.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_reward_server_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    args.run(args)


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
