"""How the code is laid out, where a change could quietly undo it: the trainer stays short enough to read in one
sitting, and the packages depend one way (CONTRIBUTING.md, "Code style")."""

import subprocess
import sys
from pathlib import Path

import trl_nft


PACKAGE = Path(trl_nft.__file__).parent


def test_the_trainer_reads_in_one_sitting():
    # New capabilities go into their own modules (policies.py, checkpointing.py, faults.py, ...), which it calls.
    lines = (PACKAGE / "nft_trainer.py").read_text().count("\n")
    assert lines <= 900, f"nft_trainer.py has {lines} lines: move a capability into its own module"


def test_the_prompt_sets_import_no_reward():
    # The rewards read what the prompt sets write (trl_nft.prompt_formats), never the other way round.
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, trl_nft.prompts; print(*sorted(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "trl_nft.prompts" in imported and not [name for name in imported if name.startswith("trl_nft.rewards")]
