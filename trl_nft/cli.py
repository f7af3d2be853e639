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
import signal
import subprocess
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
    the script does not know (`--num_processes`, `--accelerate_config NAME_OR_FILE`, ...) go to accelerate.

    Ends with the training's exit code (128 + N when signal N ended it). SIGINT and SIGTERM reach the training
    process(es), which stop after the current optimizer step (a second SIGINT: at once), and the training never
    outlives this process (`trl_nft.signals.exit_with_launcher`). See docs/reliability.md."""
    from accelerate.commands import launch as accelerate_launch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from .scripts import nft as script
    from .signals import LAUNCHER_PID_ENV

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
    launch_args = accelerate_launch.launch_command_parser().parse_args([*launch_args, script.__file__, *script_argv])
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # inherited by the training processes: they die with us
    # accelerate's single-process launcher neither forwards signals nor returns the exit code (it raises
    # CalledProcessError, a second traceback); ours, in its place, does both. Multi-process runs (and local DeepSpeed)
    # go through torch.distributed.run, whose agent already forwards SIGINT/SIGTERM to every rank.
    original_simple_launcher = accelerate_launch.simple_launcher
    accelerate_launch.simple_launcher = _simple_launcher
    try:
        accelerate_launch.launch_command(launch_args)
    except ChildFailedError as error:  # each failed rank printed its own traceback
        _, failure = error.get_first_failure()
        return _exit_code(failure.exitcode)
    except SignalException as error:  # the agent stopped the ranks on this signal (on a second one: with SIGTERM)
        return 128 + error.sigval
    except KeyboardInterrupt:  # SIGINT before any training process started
        return 128 + signal.SIGINT
    finally:
        accelerate_launch.simple_launcher = original_simple_launcher
    return 0


def _simple_launcher(args: argparse.Namespace) -> None:
    """accelerate's `simple_launcher` (the same command and environment), but the training process runs in its own
    session and this process forwards SIGINT and SIGTERM to it; a failure exits with its exit code."""
    from accelerate.utils import prepare_simple_launcher_cmd_env

    command, env = prepare_simple_launcher_cmd_env(args)
    # Its own session, as torch.distributed.run starts its ranks: a Ctrl-C in the terminal then reaches this process
    # alone, which forwards it once. In our process group the training would get it twice, and a second SIGINT means
    # "stop at once".
    process = subprocess.Popen(command, env=env, start_new_session=True)
    interrupts = 0

    def forward(signum, frame):
        nonlocal interrupts
        interrupts += signum == signal.SIGINT
        # A first signal stops the training after its step, a second SIGINT at once; a third finds it stuck.
        process.send_signal(signal.SIGKILL if interrupts >= 3 else signum)

    # Until these are in place (a few instructions), a signal ends this process; the training then gets SIGTERM from
    # the kernel (`exit_with_launcher`), as if forwarded.
    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        returncode = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if returncode < 0:  # no traceback to read: say what happened (the OOM killer's SIGKILL, ...)
        print(f"trl nft: the training process was killed by {signal.Signals(-returncode).name}.", file=sys.stderr)
    if returncode != 0:
        raise SystemExit(_exit_code(returncode))


def _exit_code(returncode: int) -> int:
    """A child's return code as a shell reports it: 128 + N for a child killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _add_reward_server_parser(subparsers) -> None:
    from .rewards.server import RequestLimits

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
    parser.add_argument(
        "--allow_unauthenticated",
        action="store_true",
        help="serve on a non-loopback --host without a token (refused otherwise); only on a trusted network",
    )
    parser.add_argument("--batch_size", type=_positive_int, default=32, help="most images per call to a reward")
    limits = RequestLimits()  # the defaults; a request over a limit is refused with 413
    parser.add_argument(
        "--max_body_mb",
        type=_positive_int,
        default=limits.max_body_mb,
        help="most MiB in a request body (default: %(default)s)",
    )
    parser.add_argument(
        "--max_images",
        type=_positive_int,
        default=limits.max_images,
        help="most images in a request (default: %(default)s)",
    )
    parser.add_argument(
        "--max_image_base64_mb",
        type=_positive_int,
        default=limits.max_image_base64_mb,
        help="most MiB of base64 text for one image (default: %(default)s)",
    )
    parser.add_argument(
        "--max_image_pixels",
        type=_positive_int,
        default=limits.max_image_pixels,
        help="most pixels (width x height) in one image, read from its header before decoding (default: %(default)s)",
    )
    parser.add_argument(
        "--device", default=None, help="device of model-backed rewards (default: cuda when available, else cpu)"
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype of model-backed rewards")
    parser.set_defaults(run=reward_server)


def reward_server(args: argparse.Namespace) -> None:
    from .rewards.server import RequestLimits, check_exposure, serve

    token = args.token or None
    try:  # before anything is imported or loaded
        check_exposure(args.host, token, args.allow_unauthenticated)
    except ValueError as error:
        raise SystemExit(f"trl-nft reward-server: {error}") from error
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
    limits = RequestLimits(
        max_body_mb=args.max_body_mb,
        max_images=args.max_images,
        max_image_base64_mb=args.max_image_base64_mb,
        max_image_pixels=args.max_image_pixels,
    )
    serve(
        rewards,
        host=args.host,
        port=args.port,
        token=token,
        allow_unauthenticated=args.allow_unauthenticated,
        max_batch_size=args.batch_size,
        limits=limits,
    )


if __name__ == "__main__":
    main()
