"""Checkpoints that are whole or absent.

A checkpoint is written in a temporary folder beside its final place, each file flushed to disk (fsync), then a
manifest of its files, and only then renamed into place (one atomic rename) and its parent folder flushed. A run killed
while saving leaves at most a temporary folder, which is never taken for a checkpoint and which the next run removes;
the checkpoints saved before it stay as they were.

The prompt order resumes too: `ResumableRepeatSampler` puts its shuffle where an uninterrupted run's would be at the
start of each epoch.
"""

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints
from transformers.utils import logging
from trl.trainer.utils import RepeatSampler


logger = logging.get_logger(__name__)

MANIFEST_NAME = "checkpoint_manifest.json"  # written last: the files of the checkpoint and their sizes
TEMPORARY_PREFIX = "tmp-"  # not `checkpoint-*`, so that transformers' rotation and `get_last_checkpoint` skip it
RESUME_FROM_NEWEST = ("true", "last")  # the strings (any case) that mean "the newest whole checkpoint"
_TEMPORARY_DIR = re.compile(rf"^{TEMPORARY_PREFIX}{PREFIX_CHECKPOINT_DIR}-\d+$")


@contextlib.contextmanager
def atomic_checkpoint_dir(
    final_dir: str, writer: bool = True, barrier: Callable[[], None] = lambda: None
) -> Iterator[str]:
    """Yield the temporary folder in which to write the checkpoint `final_dir`; when the block ends, flush its files,
    write its manifest and rename it to `final_dir`.

    The temporary folder is `<parent>/tmp-<name>/<name>`: inside it the checkpoint already has its own name, so that
    code which writes `<run dir>/<name>` (transformers' `Trainer._save_checkpoint`) writes it when given
    `<parent>/tmp-<name>` as its run dir. A checkpoint saved again at the same step (by a run resumed from an earlier
    one) replaces the old folder. If the block raises, the temporary folder is removed and nothing is renamed.

    In a run of several processes every process enters the block, since each may write files (its RNG state): the
    `writer` (the process that saves) prepares and commits the folder, and `barrier` (waiting for every process)
    keeps the others from writing before the folder is ready, and the commit from starting before they are done.
    """
    parent, name = os.path.split(os.path.normpath(final_dir))
    temporary_root = os.path.join(parent, TEMPORARY_PREFIX + name)
    staging_dir = os.path.join(temporary_root, name)
    if writer:
        shutil.rmtree(temporary_root, ignore_errors=True)  # left by a save of this step that was killed
        os.makedirs(staging_dir)
    barrier()
    try:
        yield staging_dir
        barrier()
    except BaseException:
        if writer:
            shutil.rmtree(temporary_root, ignore_errors=True)
        raise
    if writer:
        _commit(staging_dir, final_dir)


def _commit(staging_dir: str, final_dir: str) -> None:
    """Flush every file of `staging_dir`, record them in its manifest, and rename it to `final_dir`."""
    files = {}
    for folder, _, names in os.walk(staging_dir):
        for name in names:
            path = os.path.join(folder, name)
            _fsync(path)
            files[os.path.relpath(path, staging_dir)] = os.path.getsize(path)
        _fsync(folder)  # its entries: the files and subfolders it holds
    with open(os.path.join(staging_dir, MANIFEST_NAME), "w") as manifest:
        json.dump({"files": files}, manifest, indent=2, sort_keys=True)
        manifest.flush()
        os.fsync(manifest.fileno())
    _fsync(staging_dir)
    temporary_root = os.path.dirname(staging_dir)
    if os.path.exists(final_dir):
        # A directory cannot be renamed onto a full one. Killed between these two renames, the run leaves both
        # versions in the temporary folder and the checkpoints of other steps untouched.
        os.rename(final_dir, os.path.join(temporary_root, "replaced"))
    os.rename(staging_dir, final_dir)
    _fsync(os.path.dirname(final_dir))
    shutil.rmtree(temporary_root)


def _fsync(path: str) -> None:
    """Flush a file, or a folder's entries, to disk (POSIX: a folder opens read-only for this)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def missing_from_checkpoint(checkpoint_dir: str) -> list[str]:
    """What keeps the folder `checkpoint_dir` from being a whole checkpoint: its manifest, or the files the manifest
    lists that are absent or of another size. Empty when it is whole."""
    manifest = os.path.join(checkpoint_dir, MANIFEST_NAME)
    if not os.path.isfile(manifest):
        return [
            f"{MANIFEST_NAME}, which a checkpoint receives last, once all its files are on disk (this is not a "
            "checkpoint-N folder of a DiffusionNFTTrainer run, or its save was interrupted)"
        ]
    with open(manifest) as file:
        files = json.load(file)["files"]
    missing = []
    for name, size in files.items():
        path = os.path.join(checkpoint_dir, name)
        if not os.path.isfile(path):
            missing.append(name)
        elif os.path.getsize(path) != size:
            missing.append(f"{name} as saved ({size} bytes, now {os.path.getsize(path)})")
    return missing


def is_whole_checkpoint(path: str) -> bool:
    """Whether `path` is a checkpoint folder with every file it was saved with."""
    return os.path.isdir(path) and not missing_from_checkpoint(path)


def newest_whole_checkpoint(output_dir: str) -> str | None:
    """The whole `checkpoint-N` folder of `output_dir` with the highest step N, or None if there is none."""
    for checkpoint in reversed(sort_checkpoints(output_dir)):  # by step, oldest first
        if is_whole_checkpoint(checkpoint):
            return checkpoint
        logger.warning(
            f"Skipping {checkpoint}: it is not a whole checkpoint (missing {missing_from_checkpoint(checkpoint)[0]})."
        )
    return None


def remove_interrupted_saves(output_dir: str) -> None:
    """Delete the temporary folders that saves killed before their rename left in `output_dir`."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if _TEMPORARY_DIR.match(name):
            logger.info(f"Removing {name} in {output_dir}: the unfinished folder of a save that was interrupted.")
            shutil.rmtree(os.path.join(output_dir, name))


def resolve_resume_checkpoint(value: str | os.PathLike | bool | None, output_dir: str) -> str | None:
    """The checkpoint folder that `resume_from_checkpoint=value` resumes from: None (start afresh) for None or False;
    the newest whole checkpoint in `output_dir` for True, or for the strings `"true"` and `"last"` (any case), as the
    command line passes them; otherwise the folder `value`, which must be a whole checkpoint. A `ValueError` naming the
    field says why when there is no such checkpoint."""
    if value is None or value is False:
        return None
    if value is True or (isinstance(value, str) and value.lower() in RESUME_FROM_NEWEST):
        checkpoint = newest_whole_checkpoint(output_dir)
        if checkpoint is None:
            raise ValueError(
                f"resume_from_checkpoint={value!r}: output_dir={output_dir!r} holds no whole checkpoint (a "
                "checkpoint-N folder with all its files) to resume from. Leave resume_from_checkpoint unset to start a "
                "new run, or set output_dir to the folder of the run to resume."
            )
        return checkpoint
    if not os.path.isdir(value):
        raise ValueError(
            f"resume_from_checkpoint={os.fspath(value)!r} is not a folder; give a checkpoint folder "
            "(<output_dir>/checkpoint-N), or true for the newest whole checkpoint in output_dir."
        )
    missing = missing_from_checkpoint(value)
    if missing:
        raise ValueError(
            f"resume_from_checkpoint={os.fspath(value)!r} is not a whole checkpoint: it lacks {'; '.join(missing)}. "
            "Give another checkpoint folder, or true for the newest whole checkpoint in output_dir."
        )
    return os.fspath(value)


class ResumableRepeatSampler(RepeatSampler):
    """TRL's `RepeatSampler`, whose shuffle is where an uninterrupted run's is at each epoch: `transformers.Trainer`
    calls `set_epoch(epoch)` before each epoch, which reseeds the sampler's generator and redraws the orders of the
    epochs before (one permutation each), so that a run resumed in its third epoch samples the prompts of that epoch
    in the order an uninterrupted run does (RepeatSampler's generator, restarted in the resumed process, would repeat
    the first epoch's). The orders are RepeatSampler's own, epoch after epoch."""

    def set_epoch(self, epoch: int) -> None:
        if not self.shuffle or self.seed is None:
            return
        self.generator.manual_seed(self.seed)
        for _ in range(epoch):
            torch.randperm(self.num_samples, generator=self.generator)
