"""Stopping a training process on SIGINT / SIGTERM, and never outliving the `trl nft` launcher.

`trl nft` forwards SIGINT and SIGTERM to the training process(es) (`trl_nft.cli`); this is the training side, used by
`trl_nft/scripts/nft.py`:

- `stop_on_signals(trainer)`: while `trainer.train()` runs, SIGINT or SIGTERM asks the trainer to stop at the end of
  the current optimizer step, as `transformers` stops at `max_steps` (with a checkpoint there when
  `save_strategy="steps"`), so that `--resume_from_checkpoint` continues the run. A second signal, if either is a
  SIGINT (a second Ctrl-C; torch.distributed.run turns the second into a SIGTERM), stops at once: `StopNow` (a
  `KeyboardInterrupt`) is raised wherever the process is, abandoning the step. Repeated SIGTERMs are one request:
  SIGTERM often comes twice, from the launcher and from a scheduler that signals every process of a job (SLURM), or
  from the kernel, once per thread of a dying launcher (`exit_with_launcher`).
- `exit_with_launcher()`: asks the kernel to send this process SIGTERM when the launcher dies, even by SIGKILL.
"""

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Iterator

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import SaveStrategy
from transformers.utils import logging


logger = logging.get_logger(__name__)

#: Set by `trl nft` to its own pid for the processes it starts (`exit_with_launcher` reads it).
LAUNCHER_PID_ENV = "TRL_NFT_LAUNCHER_PID"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class StopNow(KeyboardInterrupt):
    """A second stop signal, one of the two a SIGINT: the current step is abandoned. A `KeyboardInterrupt`, so that `except Exception` does
    not swallow it and `finally` blocks (a checkpoint writer's clean-up) still run."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopRequest:
    """What `stop_on_signals` yields. `signum` is the signal the run stopped for (the same on every process), or None
    while it runs on."""

    def __init__(self):
        self.signum: int | None = None
        self.received: list[int] = []  # the stop signals this process received, in order


class _StopAtStepEnd(TrainerCallback):
    """Stops the trainer at the end of the optimizer step during which a stop signal arrived."""

    def __init__(self, trainer, request: StopRequest):
        self.trainer, self.request = trainer, request

    def on_step_end(self, args, state, control, **kwargs):
        signum = self.request.received[0] if self.request.received else 0
        accelerator = self.trainer.accelerator
        if accelerator.num_processes > 1:
            # Every process must stop at the same step: one that went on would wait forever in the next collective.
            # The signals reach the processes at slightly different times, so they agree on one here, every step.
            signum = int(accelerator.gather(torch.tensor([signum], device=accelerator.device)).max())
        if signum == 0:
            return
        self.request.signum = signum
        control.should_training_stop = True
        # As at `max_steps` (transformers' DefaultFlowCallback): a checkpoint with "steps". With "epoch", transformers
        # saves at the end of the interrupted epoch, which follows; "no" and "best" are left as chosen.
        if args.save_strategy == SaveStrategy.STEPS:
            control.should_save = True
        if state.is_world_process_zero:
            where = (
                f"its checkpoint, {args.output_dir}/checkpoint-{state.global_step}, resumes with "
                f"--resume_from_checkpoint"
                if args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH)
                else f"no checkpoint is written (save_strategy={args.save_strategy.value})"
            )
            logger.warning(f"{signal.Signals(signum).name}: training stops after step {state.global_step}; {where}.")


@contextlib.contextmanager
def stop_on_signals(trainer) -> Iterator[StopRequest]:
    """Within this context (around `trainer.train()`, in the main thread), SIGINT and SIGTERM stop the trainer at
    the end of the current optimizer step; a second signal, if either is a SIGINT, raises `StopNow`. The previous
    handlers are restored after.

        with stop_on_signals(trainer) as stop:
            trainer.train()
        if stop.signum is not None:
            ...  # stopped early: the run is not finished
    """
    request = StopRequest()

    def handle(signum, frame):
        request.received.append(signum)
        if len(request.received) > 1 and signal.SIGINT in request.received:
            raise StopNow(signum)
        if len(request.received) == 1 and trainer.is_world_process_zero():
            name = signal.Signals(signum).name
            logger.warning(f"{name}: stopping after the current optimizer step (a further SIGINT stops at once).")

    callback = _StopAtStepEnd(trainer, request)
    trainer.add_callback(callback)
    previous = {signum: signal.signal(signum, handle) for signum in STOP_SIGNALS}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        trainer.remove_callback(callback)


def exit_with_launcher() -> None:
    """When started by `trl nft` (`LAUNCHER_PID_ENV` set) on Linux: have the kernel send this process SIGTERM when the
    launcher dies, however it dies (`prctl(PR_SET_PDEATHSIG)`), so that training never outlives it; the SIGTERM then
    stops the run as a forwarded one does. Exits at once if the launcher is already gone.

    Elsewhere (another launcher, a plain `python` run, macOS) it does nothing: tying a run started from a shell to
    that shell would stop `nohup` runs when the shell exits."""
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher is None or not sys.platform.startswith("linux"):
        return
    launcher = int(launcher)
    if os.getppid() == launcher:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"prctl(PR_SET_PDEATHSIG): {os.strerror(error)}")
        # The launcher may have died before prctl: then no signal comes, and the parent is no longer the launcher.
        if os.getppid() == launcher:
            return
    elif _is_alive(launcher):
        return  # started by a launcher that `trl nft` started (mpirun, a DeepSpeed launcher): that one answers for us
    sys.exit(f"trl nft: the launcher (pid {launcher}) exited before training started; stopping.")


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    return True
