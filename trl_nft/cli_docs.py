"""The lists of names in docs/cli.md, generated from the registries: model names (`trl_nft.model_names`), embedded
models and their presets (`trl_nft.embedded`), prompt sets and each reward's default (`trl_nft/scripts/nft.py`),
rewards (`trl_nft.rewards`) and the example configs (`examples/configs/`).

    python -m trl_nft.cli_docs          # rewrites the generated parts of docs/cli.md (run from a checkout)

Each generated part sits between `<!-- generated: NAME -->` and `<!-- end generated: NAME -->`; the text around them is
written by hand. `tests/test_cli_docs.py` fails when the page and the registries disagree.
"""

import re
from collections.abc import Callable
from pathlib import Path

from .embedded import EMBEDDED_MODELS, MODEL_PRESETS
from .model_names import MODEL_ALIASES
from .rewards import list_rewards
from .scripts.nft import DEFAULT_PROMPT_SET, DEFAULT_PROMPTS, PROMPT_SETS


ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "cli.md"


def models_table() -> str:
    """What `--model` takes by name."""
    rows = [f"| `{alias}` | `{hub_id}` on the Hub |" for alias, hub_id in MODEL_ALIASES.items()]
    for name in EMBEDDED_MODELS:
        preset = f"; preset `trl_nft/presets/{MODEL_PRESETS[name]}`" if name in MODEL_PRESETS else ""
        rows.append(f"| `{name}` | embedded, built offline{preset} |")
    return "\n".join(["| name | model |", "|---|---|", *rows])


def prompt_sets_table() -> str:
    """What `--dataset` takes by name."""
    rows = [
        f"| `{name}` | {', '.join(f'`{column}`' for column in entry.columns)} | {entry.description} |"
        for name, entry in PROMPT_SETS.items()
    ]
    return "\n".join(["| name | columns | prompts |", "|---|---|---|", *rows])


def rewards_table() -> str:
    """What `--reward` takes, each with the prompt set it trains on unless `--dataset` says otherwise."""
    rows = [f"| `{name}` | `{DEFAULT_PROMPTS.get(name, DEFAULT_PROMPT_SET)}` |" for name in list_rewards(builtin=True)]
    return "\n".join(["| reward | default `--dataset` |", "|---|---|", *rows])


def presets_table() -> str:
    """The example configs, each with the first sentence of its leading comment."""
    rows = ["| file | run |", "|---|---|"]
    for path in sorted((ROOT / "examples" / "configs").glob("*.yaml")):
        comment = []
        for line in path.read_text().splitlines():
            if not line.startswith("#") or line[1:].strip().startswith(("trl nft", "trl-nft")):
                break  # the comment ends, or shows the command that runs the file
            comment.append(line[1:].strip())
        sentence = re.split(r"(?<=[a-z)\]])[.:] ", " ".join(comment), maxsplit=1)[0].rstrip(".")
        rows.append(f"| `{path.name}` | {sentence} |")
    return "\n".join(rows)


#: The generated parts of docs/cli.md, by name.
PARTS: dict[str, Callable[[], str]] = {
    "models": models_table,
    "prompt-sets": prompt_sets_table,
    "rewards": rewards_table,
    "presets": presets_table,
}


def render(page: str) -> str:
    """`page` with each generated part rewritten from the registries."""
    for name, make in PARTS.items():
        start, end = f"<!-- generated: {name} -->", f"<!-- end generated: {name} -->"
        if page.count(start) != 1 or page.count(end) != 1:
            raise ValueError(f"docs/cli.md needs one {start} ... {end} block.")
        head, rest = page.split(start)
        tail = rest.split(end)[1]
        page = f"{head}{start}\n{make()}\n{end}{tail}"
    return page


if __name__ == "__main__":
    PAGE.write_text(render(PAGE.read_text()))
    print(f"{PAGE} rewritten from the registries.")
