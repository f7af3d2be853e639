"""The `trl-nft` command line. Each subcommand has a function that adds its parser (`_add_<command>_parser`) and one
that runs it; register a new subcommand in `build_parser`.

    trl-nft reward-server --reward hpsv2 --reward clip_score --reward_kwargs 'clip_score={"batch_size": 8}'
"""

import argparse
import contextlib
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
from typing import NoReturn

import torch

from .rewards import RewardModel, get_reward
from .rewards.remote import TOKEN_ENV_VAR


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trl-nft", description="DiffusionNFT online RL for diffusion models.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_nft_parser(subparsers)
    _add_estimate_memory_parser(subparsers)
    _add_reward_server_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["nft"]:  # everything after `nft` belongs to the training script's parser
        return nft(argv[1:])
    if argv[:1] == ["estimate-memory"]:  # the run's flags, as `nft` takes them, and --gpu_memory
        return estimate_memory(argv[1:])
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
    outlives this process (`trl_nft.signals.exit_with_launcher`). See docs/reliability.md.

    Every bad input is refused first, in one line, with exit code 2 (`trl_nft.preflight`)."""
    from . import preflight

    try:
        script_argv, launch_args = preflight.check_launch(argv)
    except (ValueError, OSError) as error:
        _refuse(" ".join(str(error).split()))
    from accelerate.commands import launch as accelerate_launch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from .signals import LAUNCHER_PID_ENV

    launch_parser = accelerate_launch.launch_command_parser()
    launch_parser.error = _refuse  # a bad value of an accelerate flag: one line, not accelerate's usage
    launch_args = launch_parser.parse_args([*launch_args, preflight.SCRIPT, *script_argv])
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # inherited by the training processes: they die with us
    # accelerate's single-process launcher neither forwards signals nor returns the exit code (it raises
    # CalledProcessError, a second traceback); ours, in its place, does both. Multi-process runs (and local DeepSpeed)
    # go through torch.distributed.run, whose agent already forwards SIGINT/SIGTERM to every rank.
    original_simple_launcher = accelerate_launch.simple_launcher
    accelerate_launch.simple_launcher = _simple_launcher
    try:
        with _without_accelerate_default_warning():
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


def _refuse(message: str) -> NoReturn:
    """A bad input: one line on stderr, exit code 2 (as argparse)."""
    print(f"trl nft: {message}", file=sys.stderr)
    raise SystemExit(2)


def _simple_launcher(args: argparse.Namespace) -> None:
    """accelerate's `simple_launcher` (the same command and environment), but the training process runs in its own
    session and this process forwards SIGINT and SIGTERM to it; a failure exits with its exit code."""
    from accelerate.utils import prepare_simple_launcher_cmd_env

    if (args.num_processes or 1) > 1 and args.mpirun_hostfile is None:  # accelerate would start one, silently
        _refuse(
            f"--num_processes {args.num_processes} asks for {args.num_processes} processes, but accelerate starts "
            "only one without --multi_gpu: add --multi_gpu (on CPUs: --use_cpu --multi_gpu), or an "
            "--accelerate_config that sets a distributed_type."
        )
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


@contextlib.contextmanager
def _without_accelerate_default_warning():
    """Within this context, `accelerate launch` does not warn that it used its defaults when every value it lists is
    the one a plain single-process run means (1 process, 1 machine, no mixed precision, no dynamo; the training sets
    its own precision). Any other listed value (more GPUs found, CPU threads chosen) keeps the warning."""
    launch_logger = logging.getLogger("accelerate.commands.launch")
    plain = {
        "`--num_processes` was set to a value of `1`",
        "`--num_machines` was set to a value of `1`",
        "`--mixed_precision` was set to a value of `'no'`",
        "`--dynamo_backend` was set to a value of `'no'`",
    }

    def keep(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("The following values were not passed to `accelerate launch`"):
            return True
        listed = {line.strip() for line in message.splitlines()[1:-1]}
        return not listed <= plain

    launch_logger.addFilter(keep)
    try:
        yield
    finally:
        launch_logger.removeFilter(keep)


def _exit_code(returncode: int) -> int:
    """A child's return code as a shell reports it: 128 + N for a child killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


# -------------------------------------------------------------------------------------------- estimate-memory


def _add_estimate_memory_parser(subparsers) -> None:
    # `main` hands the arguments to `estimate_memory`, whose parser is the training script's; this is for `--help`.
    subparsers.add_parser(
        "estimate-memory",
        help="predict a run's peak GPU memory, offline (`trl-nft estimate-memory --help` lists every flag)",
        add_help=False,
    )


def estimate_memory(argv: list[str]) -> int:
    """Print the predicted peak GPU memory of one process of the run that `trl nft` with the same flags (`--config`,
    `--model`, ...) would make, term by term (`trl_nft.memory`), and with `--gpu_memory GIB` whether it fits, else the
    cheapest settings that do. Nothing is downloaded for the models whose configs ship with the package. The run is
    taken in bf16 (a GPU's default) unless `--fp16` or `--bf16 false` says otherwise."""
    from dataclasses import dataclass, field

    from trl import TrlParser

    from .memory import GIB, MemoryModel, MemorySettings, cheapest_fitting_settings
    from .nft_config import NFTConfig
    from .scripts.nft import NFTScriptArguments

    @dataclass
    class EstimateMemoryArguments:
        gpu_memory: float | None = field(
            default=None, metadata={"help": "GPU memory in GiB: says whether the run fits, else what would."}
        )

    flags = {token.split("=")[0] for token in argv}
    defaults = [] if flags & {"--bf16", "--fp16"} else ["--bf16", "true"]  # a GPU's precision, on any machine
    parser = TrlParser((NFTScriptArguments, NFTConfig, EstimateMemoryArguments), prog="trl-nft estimate-memory")
    try:
        script_args, config, estimate_args = parser.parse_args_and_config([*argv, *defaults, "--use_cpu", "true"])
        settings = MemorySettings.from_config(config)
        memory_model = MemoryModel(script_args.model_name_or_path, settings)
    except ValueError as error:
        raise SystemExit(f"trl-nft estimate-memory: {error}") from error
    estimate = memory_model.estimate(settings)
    print(f"{script_args.model_name_or_path} at {memory_model.resolution} px, {memory_model.text_tokens} text tokens:")
    print(estimate.table())
    if estimate_args.gpu_memory is not None:
        found = cheapest_fitting_settings(memory_model, settings, int(estimate_args.gpu_memory * GIB))
        if found is None:
            print(f"Does not fit in {estimate_args.gpu_memory:g} GiB, even with every memory setting.")
        elif not found[0]:
            print(f"Fits in {estimate_args.gpu_memory:g} GiB as set.")
        else:
            changes = " ".join(f"--{key} {value}" for key, value in found[0].items())
            print(
                f"Does not fit in {estimate_args.gpu_memory:g} GiB as set; the cheapest settings that fit: {changes} "
                f"(predicted peak {found[1].peak / GIB:.1f} GiB)."
            )
    return 0


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
