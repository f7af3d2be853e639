"""`trl nft` refuses every bad input before it launches (`trl_nft/preflight.py`): one line that names the flag and the
fix, exit code 2, before accelerate starts a training process and before diffusers is imported; names, columns and Hub
checkpoints before transformers' Trainer stack too.

Each bad input runs `trl nft` in a subprocess, as a user would; the modules it imported are listed at its exit (a
`sitecustomize` on PYTHONPATH), and the time it took is printed (the issue asks for under 10 s; a loaded machine takes
longer, so the bound asserted is a generous one)."""

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from trl_nft.preflight import HUB_TIMEOUT
from trl_nft.scripts.nft import (
    PROMPT_SETS,
    drawbench_prompts,
    load_prompts,
    local_file_columns,
    make_parser,
    parse_reward_specs,
    pickapic_prompts,
)


BIN = Path(sys.executable).parent
GENEROUS_BOUND = 120  # seconds; the training would not have started either way (see the imports asserted)
# Imported by the full parse (transformers' Trainer stack): not needed to check names, columns and the Hub.
TRAINING_ARGUMENTS = "transformers.training_args"
# Loaded at start-up in the subprocess: prints the modules it imported, whatever ends it.
LIST_MODULES_AT_EXIT = (
    "import atexit, sys\natexit.register(lambda: print('imported modules:', *sorted(sys.modules), file=sys.stderr))\n"
)


def _trl_nft(tmp_path: Path, *argv: str, **env: str) -> tuple[subprocess.CompletedProcess, float, set[str]]:
    """`trl nft ARGV` in `tmp_path`, offline and with an empty Hub cache: (result, seconds, modules imported)."""
    (tmp_path / "site").mkdir(exist_ok=True)
    (tmp_path / "site" / "sitecustomize.py").write_text(LIST_MODULES_AT_EXIT)
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "hub-cache"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "site"), os.environ.get("PYTHONPATH")])),
        **env,
    }
    start = time.monotonic()
    result = subprocess.run(
        [str(BIN / "trl"), "nft", *argv], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600
    )
    seconds = time.monotonic() - start
    lines = result.stderr.splitlines()
    imported = {module for line in lines if line.startswith("imported modules:") for module in line.split()[2:]}
    result.stderr = "\n".join(line for line in lines if not line.startswith("imported modules:"))
    return result, seconds, imported


def _assert_refused_in_one_line(result, seconds, imported, expected: str, capsys, name: str, cwd: Path) -> str:
    with capsys.disabled():
        print(f"\n  trl nft, {name}: refused in {seconds:.1f} s")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("trl nft:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr
    assert result.stdout == ""
    # Before the model and the training: neither diffusers nor the trainer was imported, no process was launched.
    assert not {"diffusers", "trl_nft.nft_trainer"} & imported
    assert not (cwd / "nft-out").exists()
    assert seconds < GENEROUS_BOUND
    return lines[0]


# (what is wrong, argv, what the line says, found before transformers' Trainer stack is imported)
BAD_INPUTS = [
    ("model name", ["--model", "sd35-medium"], "Did you mean 'sd3.5-medium'", True),
    ("model folder", ["--model", "not_a_pipeline"], "a folder without model_index.json", True),
    ("reward name", ["--reward", "pickscor"], "Did you mean 'pickscore'", True),
    (
        "reward option",
        ["--reward", "clip_score", "--reward_kwargs", 'clip_score={"chekpoint": "x"}'],
        "chekpoint",
        True,
    ),
    ("prompt set name", ["--dataset", "genevl"], "Did you mean 'geneval'", True),
    ("prompt file", ["--dataset", "./no_such_prompts.jsonl"], "no such file", True),
    ("prompt column", ["--dataset", "captions.jsonl"], "has no 'prompt' column (columns: ['caption'])", True),
    ("reserved column", ["--dataset", "reserved.csv"], "a column named 'self'", True),
    (
        "column a reward needs",
        ["--reward", "geneval", "--dataset", "simple"],
        "needs the dataset column 'metadata'",
        True,
    ),
    ("dataset path without ocr", ["--dataset_path", "prompts.txt"], "--dataset_path only applies", True),
    ("YAML key", ["--config", "typo.yaml"], "unknown key 'learning_rte'. Did you mean learning_rate", False),
    ("flag", ["--learning_rte", "1e-4"], "unknown flag --learning_rte. Did you mean --learning_rate", False),
    ("stray value", ["--max_steps", "3", "4"], "unexpected value '4'", False),
    ("value that does not parse", ["--learning_rate", "fast"], "invalid float value: 'fast'", False),
    ("value out of range", ["--learning_rate", "-1"], "learning_rate=-1.0 is invalid", False),
    ("GRPO's beta", ["--beta", "0.04"], "beta=0.04 is invalid: the NFT strength is `nft_beta`", False),
    ("config file", ["--config", "missing.yaml"], "--config missing.yaml: cannot read it", True),
    ("weights", ["--reward", "jpeg_compressibility,ocr", "--reward_weights", "1"], "1 weight for 2 rewards", False),
    ("evaluation", ["--eval_strategy", "steps"], "--eval_strategy steps needs --eval_dataset", False),
    ("processes", ["--use_cpu", "--num_processes", "2"], "--num_processes 2 asks for 2 processes", False),
    (
        "groups on the launch's processes",
        ["--use_cpu", "--multi_gpu", "--num_processes", "2", "--per_device_train_batch_size", "3"],
        "(per_device_train_batch_size=3 x 2 processes x steps_per_generation=1 = 6) must divide into groups",
        False,
    ),
]


@pytest.mark.parametrize(("name", "argv", "expected", "light"), BAD_INPUTS, ids=[entry[0] for entry in BAD_INPUTS])
def test_a_bad_input_is_refused_before_launch_in_one_line(tmp_path, capsys, name, argv, expected, light):
    (tmp_path / "not_a_pipeline").mkdir()
    (tmp_path / "captions.jsonl").write_text(json.dumps({"caption": "a cat"}) + "\n")
    (tmp_path / "reserved.csv").write_text("prompt,self\na cat,1\n")
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({"learning_rte": 1e-4, "max_steps": 2}))
    result, seconds, imported = _trl_nft(tmp_path, "--output_dir", "nft-out", *argv)
    _assert_refused_in_one_line(result, seconds, imported, expected, capsys, name, tmp_path)
    assert (TRAINING_ARGUMENTS in imported) != light


def test_checkpoints_that_cannot_be_fetched_offline_are_named_in_one_line_the_model_first(tmp_path, capsys):
    # The mission's command on a machine without the Hub: every checkpoint, the model first, the reason and the fix.
    result, seconds, imported = _trl_nft(tmp_path, "--model", "sd3.5-medium", "--reward", "geneval")
    line = _assert_refused_in_one_line(result, seconds, imported, "HF_HUB_OFFLINE=1", capsys, "offline Hub", tmp_path)
    model, detector, clip = (
        "stabilityai/stable-diffusion-3.5-medium (the model)",
        "facebook/mask2former-swin-small-coco-instance (reward geneval)",
        "openai/clip-vit-large-patch14 (reward geneval)",
    )
    assert line.index(model) < line.index(detector) < line.index(clip)
    assert "3 checkpoints" in line and "hf download" in line
    assert TRAINING_ARGUMENTS not in imported
    # In the cache (as `hf download` leaves it), a checkpoint is not asked for: only the model is left.
    for repo in ("facebook--mask2former-swin-small-coco-instance", "openai--clip-vit-large-patch14"):
        (tmp_path / "hub-cache" / f"models--{repo}" / "snapshots" / "0123abc").mkdir(parents=True)
    result, seconds, imported = _trl_nft(tmp_path, "--model", "sd3.5-medium", "--reward", "geneval")
    line = _assert_refused_in_one_line(
        result, seconds, imported, "1 checkpoint of", capsys, "offline Hub, cached", tmp_path
    )
    assert model in line and "reward geneval" not in line


class _Hub(http.server.BaseHTTPRequestHandler):
    """The Hub's answers to `auth_check`: `gated/*` is gated, everything else does not exist."""

    def do_GET(self):  # noqa: N802 - http.server's name
        gated = self.path.startswith("/api/models/gated/")
        self.send_response(403 if gated else 404)
        self.send_header("X-Error-Code", "GatedRepo" if gated else "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps({"error": "Access to this model is restricted."}).encode())

    def log_message(self, *args):
        pass


def test_gated_and_missing_checkpoints_are_named_with_their_fix(tmp_path, capsys):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        argv = [
            "--model",
            "gated/model",
            "--reward",
            "clip_score",
            "--reward_kwargs",
            'clip_score={"checkpoint": "no/clip"}',
        ]
        result, seconds, imported = _trl_nft(tmp_path, *argv, HF_HUB_OFFLINE="0", HF_ENDPOINT=endpoint)
    finally:
        server.shutdown()
    line = _assert_refused_in_one_line(
        result, seconds, imported, "2 checkpoints", capsys, "gated and missing", tmp_path
    )
    assert "gated/model (the model): gated: accept its licence on https://huggingface.co/gated/model" in line
    assert "hf auth login" in line
    assert "no/clip (reward clip_score): not found on the Hub" in line
    assert line.index("gated/model") < line.index("no/clip")


def test_a_hub_that_does_not_answer_is_given_up_on_within_seconds(tmp_path, capsys):
    # A server that accepts connections and never answers: the check gives up after HUB_TIMEOUT, and asks no further.
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        argv = ["--model", "owner/model", "--reward", "pickscore"]
        result, seconds, imported = _trl_nft(tmp_path, *argv, HF_HUB_OFFLINE="0", HF_ENDPOINT=endpoint)
    finally:
        listener.close()
    line = _assert_refused_in_one_line(result, seconds, imported, "cannot be reached", capsys, "hanging Hub", tmp_path)
    assert f"no answer within {HUB_TIMEOUT:g} s" in line
    assert line.index("owner/model (the model)") < line.index("yuvalkirstain/PickScore_v1 (reward pickscore)")
    assert "laion/CLIP-ViT-H-14-laion2B-s32B-b79K (reward pickscore)" in line


def test_trl_nft_help_imports_neither_diffusers_nor_the_trainer(tmp_path, capsys):
    result, seconds, imported = _trl_nft(tmp_path, "--help")
    with capsys.disabled():
        print(f"\n  trl nft --help: {seconds:.1f} s")
    assert result.returncode == 0 and "--learning_rate" in result.stdout
    assert not {"diffusers", "trl_nft.nft_trainer"} & imported


# --------------------------------------------------------------------------------------------- in-process checks


@pytest.mark.parametrize(
    "argv",
    [
        ["--reward", "jpeg_compressibility", "--max_steps", "3", "--reward", "ocr:0.5"],
        ["--reward=jpeg_compressibility", "--max_steps", "3", "--reward=ocr:0.5"],
        ["--reward", "jpeg_compressibility,ocr:0.5", "--max_steps", "3"],
        ["--reward", "jpeg_compressibility", "ocr:0.5", "--max_steps", "3"],
    ],
    ids=["repeated", "repeated with =", "commas", "spaces"],
)
def test_a_repeated_list_flag_accumulates_in_every_spelling(argv, tmp_path):
    script_args, config = make_parser().parse_args_and_config(["--output_dir", str(tmp_path), *argv])
    assert parse_reward_specs(script_args.reward) == (["jpeg_compressibility", "ocr"], [1.0, 0.5])
    assert config.max_steps == 3


def test_list_flags_of_the_config_accumulate_and_trls_own_parser_keeps_the_last_one(tmp_path):
    from trl import TrlParser

    from trl_nft import NFTConfig
    from trl_nft.scripts.nft import NFTScriptArguments

    argv = ["--output_dir", str(tmp_path), "--lora_target_modules", "to_q", "--lora_target_modules=to_k"]
    assert make_parser().parse_args_and_config(argv)[1].lora_target_modules == ["to_q", "to_k"]
    # the control: TRL's parser, which `trl nft` used before, silently keeps the last occurrence
    plain = TrlParser((NFTScriptArguments, NFTConfig)).parse_args_and_config(argv)[1]
    assert plain.lora_target_modules == ["to_k"]


def test_a_yaml_scalar_for_a_list_field_is_a_one_item_list_and_a_flag_alias_is_a_key(tmp_path):
    config = {"model": "digits-sd3", "reward": "geneval", "lora_target_modules": "to_q", "output_dir": str(tmp_path)}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    script_args, training_args = make_parser().parse_args_and_config(["--config", str(tmp_path / "run.yaml")])
    assert (script_args.model_name_or_path, script_args.reward) == ("digits-sd3", ["geneval"])
    assert training_args.lora_target_modules == ["to_q"]
    # `--no_use_peft` is an option of the parser, but `no_use_peft: true` is no alias of `use_peft`
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"no_use_peft": True, "output_dir": str(tmp_path)}))
    *_, remaining = make_parser().parse_args_and_config(
        ["--config", str(tmp_path / "run.yaml")], return_remaining_strings=True
    )
    assert remaining == ["--no_use_peft", "True"]


def test_the_columns_of_the_prompt_sets_are_those_they_build(tmp_path):
    for name in ("geneval", "simple", "digits", "digits-edit"):
        built = PROMPT_SETS[name].build("train", 0, 20)
        assert tuple(built.column_names) == PROMPT_SETS[name].columns, name
    (tmp_path / "captions.jsonl").write_text(json.dumps({"caption": "a cat"}) + "\n")
    assert tuple(pickapic_prompts(str(tmp_path / "captions.jsonl")).column_names) == PROMPT_SETS["pickapic"].columns
    (tmp_path / "drawbench.csv").write_text("Prompts,Category\na cat,Colors\n")
    assert tuple(drawbench_prompts(str(tmp_path / "drawbench.csv")).column_names) == PROMPT_SETS["drawbench"].columns
    (tmp_path / "ocr.txt").write_text('a sign that says "hello"\n')
    assert tuple(load_prompts("ocr", "train", 0, None, str(tmp_path / "ocr.txt")).column_names) == (
        PROMPT_SETS["ocr"].columns
    )


@pytest.mark.parametrize("extension", [".txt", ".jsonl", ".json", ".csv", ".parquet"])
def test_the_columns_of_a_prompt_file_are_read_without_loading_it_and_match_what_loads(tmp_path, extension):
    from datasets import Dataset

    rows = {"prompt": ["a cat", "a dog"], "tag": ["animal", "animal"]}
    path = tmp_path / f"prompts{extension}"
    if extension == ".txt":
        path.write_text("a cat\na dog\n")
    elif extension == ".json":
        path.write_text(json.dumps([{"prompt": "a cat", "tag": "animal"}, {"prompt": "a dog", "tag": "animal"}]))
    else:
        getattr(Dataset.from_dict(rows), {".jsonl": "to_json", ".csv": "to_csv", ".parquet": "to_parquet"}[extension])(
            str(path)
        )
    loaded = load_prompts(str(path), "train", 0, None, None)
    assert local_file_columns(str(path)) == tuple(loaded.column_names)
    assert loaded["prompt"] == ["a cat", "a dog"]  # a .txt file: one prompt per line


def test_the_checks_before_launch_import_neither_diffusers_nor_the_trainer():
    heavy = ("diffusers", "peft", "transformers.modeling_utils", "transformers.training_args", "trl_nft.nft_trainer")
    code = f"import sys, trl_nft.preflight, trl_nft.cli; print(sorted(m for m in {heavy} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "[]", result.stderr[-2000:]


def test_accelerate_options_in_a_yaml_config_go_to_accelerate():
    from trl_nft.preflight import check_launch_options

    parser = make_parser(prog="trl nft")
    config_remaining = ["--multi_gpu", "True", "--num_processes", "2", "--quiet", "false"]
    cli_remaining = ["--main_process_port=29512", "--accelerate_config", "zero2"]
    launch_args = check_launch_options(parser, config_remaining, cli_remaining, "run.yaml")
    # a YAML `multi_gpu: true` is the bare flag (not `--multi_gpu True`, whose `True` accelerate would take for the
    # training script); `quiet: false` is no flag at all
    assert launch_args == ["--multi_gpu", "--num_processes", "2", *cli_remaining]


def test_the_rollout_is_checked_for_the_processes_of_the_launch(tmp_path):
    from trl_nft import NFTConfig
    from trl_nft.nft_config import launching
    from trl_nft.preflight import _launch_processes

    settings = {"output_dir": str(tmp_path), "per_device_train_batch_size": 2, "num_generations": 4}
    with pytest.raises(ValueError, match=r"2 x 1 processes x steps_per_generation=1 = 2\) must divide"):
        NFTConfig(**settings)  # this process alone
    with launching(2):  # 2 x 2 images per rollout: `trl nft` does not refuse a run valid on the processes it starts
        NFTConfig(**settings)
    with launching(None):  # not known before accelerate starts them: each training process checks
        NFTConfig(**settings)
    assert _launch_processes(["--multi_gpu", "--num_processes=4"], None) == 4
    (tmp_path / "run.yaml").write_text("num_processes: 3\n")
    assert _launch_processes(["--config", str(tmp_path / "run.yaml")], str(tmp_path / "run.yaml")) == 3
    assert _launch_processes(["--accelerate_config", "multi_gpu"], None) == 8  # TRL's shipped multi_gpu.yaml
    assert _launch_processes(["--multi_gpu"], None) is None  # accelerate counts the GPUs
