"""The lists of names that users read (`trl nft --help`, docs/cli.md) come from the registries, and the docs point only
to files that exist: these tests fail when a name is added to a registry and not to the page, or the reverse."""

import re
from pathlib import Path

from trl_nft.cli_docs import PAGE, render
from trl_nft.embedded import EMBEDDED_MODELS, MODEL_PRESETS
from trl_nft.model_names import MODEL_ALIASES
from trl_nft.rewards import list_rewards
from trl_nft.scripts.nft import PROMPT_SETS, make_parser


ROOT = Path(__file__).resolve().parents[1]
# Where the project's own text lives (run outputs under benchmarks/results and virtual environments excluded).
TEXT_FILES = [
    path
    for folder in ("docs", "trl_nft", "examples", "benchmarks", "tests")
    for path in (ROOT / folder).rglob("*")
    if path.suffix in {".md", ".py", ".yaml"} and not {"results", ".venv"} & set(path.parts)
] + [ROOT / "README.md", ROOT / "CONTRIBUTING.md"]


def test_docs_cli_lists_what_the_registries_hold():
    page = PAGE.read_text()
    assert render(page) == page, "docs/cli.md differs from the registries: run `python -m trl_nft.cli_docs`"
    for name in [*MODEL_ALIASES, *EMBEDDED_MODELS, *PROMPT_SETS, *list_rewards(builtin=True)]:
        assert f"`{name}`" in page, name
    for preset in MODEL_PRESETS.values():
        assert f"`trl_nft/presets/{preset}`" in page, preset


def test_trl_nft_help_lists_every_name_from_the_registries():
    help_text = " ".join(make_parser(prog="trl nft").format_help().split())  # argparse wraps the lines
    for name in [*MODEL_ALIASES, *EMBEDDED_MODELS, *PROMPT_SETS, *list_rewards()]:
        assert re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w-]|\.\w)", help_text), name


def test_the_docs_point_only_to_files_that_exist():
    documents = {path.name for path in ROOT.rglob("*.md") if ".venv" not in path.parts}
    for path in TEXT_FILES:
        text = path.read_text()
        for name in re.findall(r"[\w.-]+\.md\b", text):  # a document mentioned by name
            assert name in documents, f"{path.relative_to(ROOT)} mentions {name}, which is not in the repository"
        if path.suffix == ".md":
            prose = re.sub(r"```.*?```|`[^`\n]*`", "", text, flags=re.DOTALL)  # links only, not code
            for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", prose):
                if "://" not in target and not target.startswith("mailto:"):
                    assert (path.parent / target).exists(), f"{path.relative_to(ROOT)} links to missing {target}"
