"""`trl nft` as a launcher: SIGINT/SIGTERM stop the training cleanly, the training never outlives the launcher (even
SIGKILLed), and a failure prints its traceback once and exits with the training's exit code. Real processes, started
as a user starts them; the training side (`trl_nft.signals`) is also tested in-process on a tiny trainer."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from transformers import TrainerCallback

from trl_nft import DiffusionNFTTrainer
from trl_nft.signals import StopNow, stop_on_signals


BIN = Path(sys.executable).parent
ENTRY_POINTS = {"trl nft": [str(BIN / "trl"), "nft"], "trl-nft nft": [str(BIN / "trl-nft"), "nft"]}
# Tiny steps that would run for hours: the run is still training when it is signalled. A sample grid at every step
# says that training has started; checkpoints only at a stop (save_steps far away), so that the one written by a stop
# is the only one.
ENDLESS_RUN = [
    *("--max_steps", "100000", "--save_steps", "100000", "--sample_logging_steps", "1"),
    *("--per_device_train_batch_size", "4", "--num_generations", "4", "--num_inference_steps", "2", "--lora_r", "4"),
    *("--report_to", "none", "--disable_tqdm", "true"),
]
TWO_CPU_PROCESSES = ["--multi_gpu", "--num_processes", "2", "--use_cpu"]  # torch.distributed.run, gloo
# Bounds for a loaded machine, not timings under test: starting takes ~15 s on one free core, stopping ~1 s.
START_TIMEOUT, STOP_TIMEOUT = 180, 60
# Rewards registered on start-up (a `sitecustomize` on PYTHONPATH): one that raises during training (its first call is
# the trainer's construction-time probe), one that holds the step in progress while a file `hold` exists in the
# working directory (and says so with a file `held`).
PLUGIN_REWARDS = textwrap.dedent(
    """
    import os
    import time

    from trl_nft.rewards import register_reward

    calls = 0


    @register_reward("explodes")
    def explodes(images, prompts, **kwargs):
        global calls
        calls += 1
        if calls > 1:
            raise RuntimeError("the reward exploded")
        return [0.0] * len(images)


    @register_reward("holds")
    def holds(images, prompts, **kwargs):
        while os.path.exists("hold"):
            open("held", "w").close()
            time.sleep(0.1)
        return [0.0] * len(images)
    """
)


def _processes_of(output_dir: Path) -> list[int]:
    """The live processes whose command line names `output_dir`: the launcher and every training process of the run
    (an exited process left unreaped has an empty command line, and holds nothing)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(output_dir).encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:  # exited meanwhile
            continue
    return pids


def _wait_until(condition, run: "Run") -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not condition():
        assert run.launcher.poll() is None, f"the run ended: {run.errors()[-3000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


class Run:
    """`trl nft ...` started in its own process group, its output in files (a pipe nobody reads could block it)."""

    def __init__(self, tmp_path: Path, entry_point: str, flags: list[str], env: dict[str, str]):
        self.output_dir = tmp_path / "run"
        self.stdout, self.stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        with open(self.stdout, "w") as stdout, open(self.stderr, "w") as stderr:
            self.launcher = subprocess.Popen(
                [*ENTRY_POINTS[entry_point], "--output_dir", str(self.output_dir), *flags],
                cwd=tmp_path,
                env=env,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )

    def wait_for_training(self) -> None:
        """Until the first sample grid is written: training has started."""
        _wait_until((self.output_dir / "samples" / "step_000001.png").is_file, self)

    def training_processes(self) -> list[int]:
        return [pid for pid in _processes_of(self.output_dir) if pid != self.launcher.pid]

    def wait(self) -> int:
        return self.launcher.wait(timeout=STOP_TIMEOUT)

    def wait_until_gone(self) -> list[int]:
        """Wait until no process of the run is left; those still there at the deadline."""
        deadline = time.monotonic() + STOP_TIMEOUT
        while _processes_of(self.output_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        return _processes_of(self.output_dir)

    def errors(self) -> str:
        return self.stderr.read_text()

    def checkpoints(self) -> list[str]:
        return sorted(path.name for path in self.output_dir.glob("checkpoint*"))


@pytest.fixture
def start(tmp_path):
    """`start(entry_point, *flags, plugins=False) -> Run`; whatever a test leaves running is killed after it."""
    runs = []

    def start_run(entry_point: str, *flags: str, plugins: bool = False) -> Run:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        if plugins:  # the rewards of PLUGIN_REWARDS
            (tmp_path / "plugins").mkdir()
            (tmp_path / "plugins" / "sitecustomize.py").write_text(PLUGIN_REWARDS)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path / "plugins"), env.get("PYTHONPATH")]))
        runs.append(Run(tmp_path, entry_point, list(flags), env))
        return runs[-1]

    yield start_run
    for run in runs:
        for pid in _processes_of(run.output_dir):  # only this test's processes name its output folder
            os.kill(pid, signal.SIGKILL)
        run.launcher.wait()


def _assert_stopped_at_a_step_end_with_its_checkpoint(run: Run) -> None:
    # One checkpoint, the stop's, complete (its trainer state is written last); the unfinished run is not exported.
    (checkpoint,) = run.checkpoints()
    step = int(checkpoint.removeprefix("checkpoint-"))
    assert (run.output_dir / checkpoint / "trainer_state.json").is_file()
    assert (run.output_dir / checkpoint / "pytorch_lora_weights.safetensors").is_file()
    assert f"training stops after step {step}; its checkpoint" in run.errors()
    assert not (run.output_dir / "pytorch_lora_weights.safetensors").exists()
    assert "Traceback" not in run.errors()


@pytest.mark.parametrize(("entry_point", "signum"), [("trl nft", signal.SIGTERM), ("trl-nft nft", signal.SIGINT)])
def test_a_signal_to_the_launcher_stops_training_after_its_step_and_exits_128_plus_the_signal(
    start, entry_point, signum
):
    run = start(entry_point, *ENDLESS_RUN)
    run.wait_for_training()
    run.launcher.send_signal(signum)
    assert run.wait() == 128 + signum
    assert run.wait_until_gone() == []
    _assert_stopped_at_a_step_end_with_its_checkpoint(run)


def test_training_dies_with_a_sigkilled_launcher(start):
    # No chance to forward anything: the kernel sends the training SIGTERM (PR_SET_PDEATHSIG), a clean stop.
    run = start("trl nft", *ENDLESS_RUN)
    run.wait_for_training()
    training = run.training_processes()
    assert len(training) == 1
    run.launcher.kill()  # the launcher alone, not its process group
    assert run.wait() == -signal.SIGKILL
    assert run.wait_until_gone() == []
    _assert_stopped_at_a_step_end_with_its_checkpoint(run)


@pytest.mark.parametrize("num_processes", [1, 2])
def test_a_second_sigint_stops_at_once_abandoning_the_step(start, tmp_path, num_processes):
    processes = TWO_CPU_PROCESSES if num_processes == 2 else []
    run = start("trl-nft nft", *processes, *ENDLESS_RUN, "--reward", "holds", "--dataset", "simple", plugins=True)
    run.wait_for_training()
    (tmp_path / "hold").touch()  # the next step stays in progress
    _wait_until(lambda: (tmp_path / "held").exists(), run)
    run.launcher.send_signal(signal.SIGINT)
    _wait_until(lambda: "stopping after the current optimizer step" in run.errors(), run)
    run.launcher.send_signal(signal.SIGINT)
    assert run.wait() == 128 + signal.SIGINT
    # torch.distributed.run's agent passes a second SIGINT on to its ranks as a SIGTERM
    assert run.errors().count(": stopped at once.") == num_processes
    assert "Traceback" not in run.errors()
    assert run.checkpoints() == []  # nothing written for the abandoned step
    assert run.wait_until_gone() == []


def test_a_failure_prints_its_traceback_once_and_exits_with_the_training_exit_code(start):
    run = start("trl nft", *ENDLESS_RUN, "--reward", "explodes", "--dataset", "simple", plugins=True)
    assert run.wait() == 1  # the training script's: an uncaught exception
    errors = run.errors()
    # One exception printed: its traceback, and those of the exceptions it chains ("raise ... from"), nothing more.
    chained = errors.count("The above exception was the direct cause") + errors.count("During handling of the above")
    assert errors.count("Traceback (most recent call last)") - chained == 1
    assert "the reward exploded" in errors and "CalledProcessError" not in errors
    assert run.wait_until_gone() == []


def test_a_training_process_killed_by_a_signal_is_reported_in_one_line_and_exits_128_plus_the_signal(start):
    run = start("trl-nft nft", *ENDLESS_RUN)
    run.wait_for_training()
    (training,) = run.training_processes()
    os.kill(training, signal.SIGKILL)  # as the out-of-memory killer does
    assert run.wait() == 128 + signal.SIGKILL
    assert run.errors().rstrip().endswith("trl nft: the training process was killed by SIGKILL.")
    assert "Traceback" not in run.errors()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_no_rank_outlives_a_signalled_or_killed_launcher(start, signum):
    run = start("trl nft", *TWO_CPU_PROCESSES, *ENDLESS_RUN)
    run.wait_for_training()
    assert len(run.training_processes()) == 2
    run.launcher.send_signal(signum)
    # SIGTERM: torch.distributed.run's agent forwards it to both ranks, which agree on the step to stop at.
    assert run.wait() == (128 + signum if signum == signal.SIGTERM else -signum)
    assert run.wait_until_gone() == []
    _assert_stopped_at_a_step_end_with_its_checkpoint(run)


# ------------------------------------------------------------------------------------------ the training side


class _SignalBeforeStep(TrainerCallback):
    """Raises `signals` in this process at the start of optimizer step `step` (1-based)."""

    def __init__(self, step: int, *signals: int):
        self.step, self.signals = step, signals

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            for signum in self.signals:
                signal.raise_signal(signum)


def _trainer(make_config, prompts_dataset, callback, **config) -> DiffusionNFTTrainer:
    args = make_config(max_steps=10, **config)
    return DiffusionNFTTrainer(
        "tiny-sd3", "jpeg_compressibility", args=args, train_dataset=prompts_dataset, callbacks=[callback]
    )


def test_a_stop_signal_ends_training_after_the_step_it_arrived_in_with_a_checkpoint(make_config, prompts_dataset):
    # SIGTERM twice, as from the launcher and from a scheduler signalling every process of the job: one clean stop.
    signals = _SignalBeforeStep(2, signal.SIGTERM, signal.SIGTERM)
    trainer = _trainer(make_config, prompts_dataset, signals, save_strategy="steps", save_steps=1000)
    previous = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(trainer) as stop:
        trainer.train()
    assert (stop.signum, trainer.state.global_step) == (signal.SIGTERM, 2)
    assert os.path.isfile(os.path.join(trainer.args.output_dir, "checkpoint-2", "trainer_state.json"))
    assert signal.getsignal(signal.SIGTERM) is previous  # the handlers are restored, the callback removed
    assert not any(type(callback).__name__ == "_StopAtStepEnd" for callback in trainer.callback_handler.callbacks)


def test_without_step_checkpoints_a_stop_writes_none(make_config, prompts_dataset):
    trainer = _trainer(make_config, prompts_dataset, _SignalBeforeStep(1, signal.SIGINT), save_strategy="no")
    with stop_on_signals(trainer) as stop:
        trainer.train()
    assert (stop.signum, trainer.state.global_step) == (signal.SIGINT, 1)
    assert not list(Path(trainer.args.output_dir).glob("checkpoint*"))


def test_a_second_stop_signal_stops_at_once(make_config, prompts_dataset):
    trainer = _trainer(
        make_config, prompts_dataset, _SignalBeforeStep(2, signal.SIGINT, signal.SIGINT), save_strategy="steps"
    )
    with pytest.raises(StopNow), stop_on_signals(trainer):
        trainer.train()
    assert trainer.state.global_step == 1  # step 2 abandoned, nothing saved
    assert not list(Path(trainer.args.output_dir).glob("checkpoint*"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# In one process (importing trl_nft takes seconds): not started by `trl nft`, then by a launcher already gone, then by
# its parent. The pid of an exited process comes as argv[1].
EXIT_WITH_LAUNCHER = textwrap.dedent(
    """
    import ctypes, os, signal, sys
    from trl_nft.signals import LAUNCHER_PID_ENV, exit_with_launcher


    def death_signal():
        value = ctypes.c_int()
        ctypes.CDLL(None).prctl(2, ctypes.byref(value), 0, 0, 0)  # PR_GET_PDEATHSIG
        return signal.Signals(value.value).name if value.value else "none"


    os.environ.pop(LAUNCHER_PID_ENV, None)
    exit_with_launcher()
    print("plain run:", death_signal())
    os.environ[LAUNCHER_PID_ENV] = sys.argv[1]
    try:
        exit_with_launcher()
    except SystemExit as exit:
        print("launcher gone:", exit.code)
    os.environ[LAUNCHER_PID_ENV] = str(os.getppid())
    exit_with_launcher()
    print("started by its launcher:", death_signal())
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_training_process_asks_for_sigterm_on_its_launcher_death_and_stops_if_it_is_already_gone():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    command = [sys.executable, "-c", EXIT_WITH_LAUNCHER, str(gone.pid)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.stdout.splitlines() == [
        "plain run: none",  # e.g. under nohup: tied to no one
        f"launcher gone: trl nft: the launcher (pid {gone.pid}) exited before training started; stopping.",
        "started by its launcher: SIGTERM",
    ], result.stderr[-3000:]
