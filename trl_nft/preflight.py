"""What `trl nft` checks before it launches: every input a user can get wrong, found before accelerate starts a
training process and before a model is loaded, each reported in one line that names the flag (or YAML key) and the
fix; `trl nft` then exits with code 2.

Cheap checks come first, before transformers and diffusers are imported (`trl nft` answers them in about as long as
importing torch takes): the model name (or folder), the rewards and their options, the prompt sets, files and their
columns against what the rewards need, and whether every Hub checkpoint the run reads (the model first, then the
rewards') can be fetched. Then the full parse, which imports `NFTConfig` (transformers): misspelled flags and YAML
keys, with the closest names, and every field's value (`NFTConfig.__post_init__`). The number of processes is checked
by `trl_nft.cli` once accelerate has resolved its own configuration.
"""

import difflib
import importlib.resources as resources
import os
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import yaml

from .embedded import EMBEDDED_MODELS
from .inputs import check_prompt_columns, check_reward_columns
from .model_names import resolve_model_name
from .rewards import RewardFunc, reward_name
from .rewards.base import resolve_checkpoint
from .scripts import nft as script


#: Seconds the Hub may take to answer before `trl nft` gives up on it (the training itself waits longer).
HUB_TIMEOUT = 5.0
#: The training script that accelerate launches.
SCRIPT = script.__file__
# How a Hub that cannot be reached is reported: the checkpoints after the first are then not asked for.
UNREACHABLE = "not in the local Hub cache, and the Hub cannot be reached"


def check_launch(argv: list[str]) -> tuple[list[str], list[str]]:
    """Check the arguments of `trl nft` and split them into the training script's and `accelerate launch`'s. A
    `ValueError` (or `OSError`) with a one-line message for the first bad input; `--help` prints the help and exits."""
    argv = script.with_model_preset(argv)
    config_path = _config_path(argv)
    if not {"-h", "--help"} & set(argv):
        light_parser = script.NFTParser(script.NFTScriptArguments, prog="trl nft")
        script_args, _ = light_parser.parse_args_and_config(argv, return_remaining_strings=True)
        check_inputs(script_args)
    from .nft_config import launching

    parser = script.make_parser(prog="trl nft")
    with launching(_launch_processes(argv, config_path)):
        script_args, training_args, config_remaining, cli_remaining = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    script.check_flags(script_args, training_args)
    launch_args = check_launch_options(parser, config_remaining, cli_remaining, config_path)
    script_argv = _without_subsequence(script.merge_list_flags(argv, parser), cli_remaining)
    return script_argv, _accelerate_config_file(launch_args)


def check_inputs(script_args: script.NFTScriptArguments) -> None:
    """The model, the rewards, the prompts and their columns, and the Hub checkpoints: what needs no `NFTConfig`."""
    model = resolve_model_name(script_args.model_name_or_path)
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "model_index.json")):
        raise ValueError(
            f"--model {script_args.model_name_or_path!r} is a folder without model_index.json: give a diffusers "
            "pipeline folder (as `pipeline.save_pretrained` writes it), a model name or a Hub id."
        )
    rewards, _ = script.parse_rewards(script_args.reward, script_args.reward_kwargs)
    names = [reward_name(reward) for reward in rewards]
    datasets = {"--dataset": script.train_dataset_name(script_args), "--eval_dataset": script_args.eval_dataset}
    for flag, name in datasets.items():
        columns = None if name is None else script.prompt_columns(name, script_args.dataset_path, flag)
        if columns is not None:
            check_prompt_columns(columns, f"{flag} {name}")
            check_reward_columns(SimpleNamespace(column_names=list(columns)), f"{flag} {name}", rewards, names)
    check_hub_access(hub_checkpoints(model, rewards, names))
    hub_datasets = [(name, flag) for flag, name in datasets.items() if name is not None and _is_hub_dataset(name)]
    check_hub_access(hub_datasets, repo_type="dataset")


def hub_checkpoints(model: str, rewards: list[RewardFunc], names: list[str]) -> list[tuple[str, str]]:
    """`(Hub id, what reads it)` for each checkpoint of the run on the Hub, the model first, each once; a local one
    must exist (a `FileNotFoundError` naming it)."""
    checkpoints: dict[str, str] = {}
    if model not in EMBEDDED_MODELS and not os.path.isdir(model):
        checkpoints[model] = "the model"
    for reward, name in zip(rewards, names, strict=True):
        for checkpoint in reward.checkpoints() if hasattr(reward, "checkpoints") else []:
            if not os.path.exists(resolve_checkpoint(checkpoint, f"The {name} reward's")):
                checkpoints.setdefault(checkpoint, f"reward {name}")
    return list(checkpoints.items())


def check_hub_access(checkpoints: list[tuple[str, str]], repo_type: str = "model") -> None:
    """A `ValueError` naming every checkpoint of `checkpoints` (`(Hub id, what reads it)`) that can be neither read
    from the local Hub cache nor fetched: offline, gated, missing, or a Hub that does not answer within
    `HUB_TIMEOUT`."""
    problems: dict[str, list[str]] = {}  # reason and fix -> the checkpoints
    unreachable = None  # once the Hub has not answered, the others are not asked
    for repo_id, what in checkpoints:
        if repo_type == "model" and _in_hub_cache(repo_id):
            continue
        reason = unreachable or _hub_problem(repo_id, repo_type)
        if reason is not None and reason.startswith(UNREACHABLE):
            unreachable = reason
        if reason is not None:
            problems.setdefault(reason, []).append(f"{repo_id} ({what})")
    if problems:
        count = sum(map(len, problems.values()))
        kind = "checkpoint" if repo_type == "model" else "dataset"
        raise ValueError(
            f"{count} {kind}{'s' if count > 1 else ''} of this run cannot be fetched from the Hub: "
            + "; ".join(f"{', '.join(named)}: {reason}" for reason, named in problems.items())
            + "."
        )


def _hub_problem(repo_id: str, repo_type: str) -> str | None:
    """Why the Hub repository `repo_id` cannot be fetched, with the fix; None when it can."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HFValidationError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        if repo_type != "model":  # a dataset may be in the `datasets` cache instead: `datasets` will say
            return None
        return (
            "not in the local Hub cache, and HF_HUB_OFFLINE=1 forbids downloads: download each where the Hub is "
            f"reachable (`hf download REPO_ID`, into {constants.HF_HUB_CACHE} here) or unset HF_HUB_OFFLINE"
        )
    try:
        _within(HUB_TIMEOUT, lambda: HfApi().auth_check(repo_id, repo_type=repo_type))
    except GatedRepoError:
        return (
            f"gated: accept its licence on https://huggingface.co/{'datasets/' if repo_type != 'model' else ''}"
            f"{repo_id} with your account, and log in here (`hf auth login`, or set HF_TOKEN)"
        )
    except RepositoryNotFoundError:
        return "not found on the Hub: check the name, or log in (`hf auth login`) if it is private"
    except HFValidationError as error:
        return f"not a valid Hub id ({_one_line(error)})"
    except HfHubHTTPError as error:
        return f"not checked: the Hub answered {_one_line(error)}; try again later"
    except Exception as error:  # noqa: BLE001 - a connection that failed or hung, however the client says so
        return (
            f"{UNREACHABLE} ({constants.ENDPOINT}: {_one_line(error) or type(error).__name__}): check the "
            "connection, or download the checkpoints beforehand and set HF_HUB_OFFLINE=1"
        )
    return None


def check_launch_options(
    parser, config_remaining: list[str], cli_remaining: list[str], config_path: str | None
) -> list[str]:
    """The arguments that `parser` left, checked as `accelerate launch` options (a `ValueError` naming an unknown one
    and the closest known names); returned as accelerate's arguments."""
    from accelerate.commands.launch import launch_command_parser

    accelerate = {option: action for action in launch_command_parser()._actions for option in action.option_strings}
    accelerate["--accelerate_config"] = SimpleNamespace(nargs=None)  # ours: a config file or a TRL config name
    known = [option for option in [*accelerate, *parser._option_string_actions] if option.startswith("--")]

    def hint(option: str, dashes: str = "--") -> str:
        close = difflib.get_close_matches(option, known, n=2, cutoff=0.75)
        return f" Did you mean {' or '.join(name.replace('--', dashes, 1) for name in close)}?" if close else ""

    launch_args = []
    for index in range(0, len(config_remaining), 2):  # `--key value` pairs, one per YAML key no field took
        key, value = config_remaining[index : index + 2]
        if key not in accelerate:
            raise ValueError(
                f"--config {config_path}: unknown key {key[2:]!r}.{hint(key, dashes='')} A key is a flag of "
                "`trl nft --help` (without the dashes) or an `accelerate launch` option."
            )
        if accelerate[key].nargs != 0:
            launch_args += [key, value]
        elif value.lower() in ("true", "1"):  # a YAML `multi_gpu: true`: the bare flag
            launch_args.append(key)
    index = 0
    while index < len(cli_remaining):
        token = cli_remaining[index]
        option, sep, _ = token.partition("=")
        if not script.is_flag(token):
            raise ValueError(
                f"unexpected value {token!r}: each value follows its flag (a list flag takes several: --reward a b)."
            )
        if option not in accelerate:
            raise ValueError(
                f"unknown flag {option}.{hint(option)} `trl nft --help` lists the training flags, `accelerate launch "
                "--help` the launch flags."
            )
        index += 1
        nargs = accelerate[option].nargs
        while not sep and nargs != 0 and index < len(cli_remaining) and not script.is_flag(cli_remaining[index]):
            index += 1  # the option's value(s)
            if nargs in (None, "?", 1):
                break
    return launch_args + cli_remaining


def _config_path(argv: list[str]) -> str | None:
    """The `--config` file, read here so that a missing or malformed one is one line (not a traceback)."""
    tokens = [part for token in argv for part in (token.split("=", 1) if token.startswith("--config=") else [token])]
    if "--config" not in tokens:
        return None
    index = tokens.index("--config")
    if index + 1 == len(tokens):
        raise ValueError("--config needs a value: a YAML file of flags.")
    path = tokens[index + 1]
    try:
        with open(path) as file:
            config = yaml.safe_load(file)
    except OSError as error:
        raise ValueError(f"--config {path}: cannot read it ({error.strerror}).") from error
    except yaml.YAMLError as error:
        raise ValueError(f"--config {path} is not valid YAML: {_one_line(error)}") from error
    if not isinstance(config, dict):
        raise ValueError(f"--config {path} must hold a YAML mapping of flag names to values.")
    return path


def _launch_processes(argv: list[str], config_path: str | None) -> int | None:
    """How many processes the launch starts, when it is known before accelerate resolves it: `--num_processes` (a flag,
    a `--config` key, or in the `--accelerate_config` file), else 1 for a launch that asks for no distribution on a
    machine with at most one GPU and no accelerate default config; None when only accelerate can tell."""
    import torch
    from accelerate.commands.config.config_args import default_config_file

    settings = yaml.safe_load(Path(config_path).read_text()) if config_path else {}
    for index, token in enumerate(argv):
        option, sep, value = token.partition("=")
        if option.startswith("--"):
            settings[option[2:]] = value if sep else (argv[index + 1] if index + 1 < len(argv) else None)
    accelerate_config = settings.get("accelerate_config") or settings.get("config_file")
    if accelerate_config is not None and "num_processes" not in settings:
        path = _accelerate_config_file(["--accelerate_config", str(accelerate_config)])[1]
        settings["num_processes"] = yaml.safe_load(Path(path).read_text()).get("num_processes")
    if settings.get("num_processes") is not None:
        return int(settings["num_processes"]) if str(settings["num_processes"]).isdigit() else None
    asked = {"multi_gpu", "use_fsdp", "use_deepspeed", "num_machines"} & settings.keys() or accelerate_config
    if asked or os.path.isfile(default_config_file) or torch.cuda.device_count() > 1:
        return None
    return 1


def _accelerate_config_file(launch_args: list[str]) -> list[str]:
    """`--accelerate_config NAME_OR_FILE` -> accelerate's `--config_file`: a file, or a config shipped with TRL
    (`zero2`, `fsdp2`, `multi_gpu`, ...)."""
    if "--accelerate_config" not in launch_args:
        return launch_args
    index = launch_args.index("--accelerate_config")
    if index + 1 == len(launch_args):
        raise ValueError("--accelerate_config needs a value (a config file or a TRL config name).")
    name = launch_args[index + 1]
    path = name if os.path.isfile(name) else str(resources.files("trl.accelerate_configs").joinpath(f"{name}.yaml"))
    if not os.path.isfile(path):
        shipped = sorted(entry.name[:-5] for entry in resources.files("trl.accelerate_configs").iterdir())
        raise ValueError(
            f"--accelerate_config {name!r} is neither a file nor one of TRL's configs ({', '.join(shipped)})."
        )
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


def _in_hub_cache(repo_id: str) -> bool:
    """Whether some snapshot of the Hub model `repo_id` is in the local Hub cache (what `from_pretrained` reads)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    snapshots = os.path.join(constants.HF_HUB_CACHE, repo_folder_name(repo_id=repo_id, repo_type="model"), "snapshots")
    return os.path.isdir(snapshots) and any(os.scandir(snapshots))


def _is_hub_dataset(name: str) -> bool:
    return name not in script.PROMPT_SETS and name.count("/") == 1 and not os.path.exists(os.path.expanduser(name))


def _within(seconds: float, call: Callable[[], object]) -> object:
    """`call()`, given up with a `TimeoutError` after `seconds` (left to finish in a daemon thread: an HTTP client
    without a timeout can wait for ever on a connection that hangs)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as error:  # noqa: BLE001 - raised again in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
