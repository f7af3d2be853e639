"""No module of the package can run code that arrives as data: no pickle-based serialisation, no `torch.load` that
may unpickle, no `eval` or `exec`, no `yaml.load` with a loader that builds arbitrary objects. Checked on the syntax
tree of every `.py` file of `trl_nft/` (so comments and strings that mention them do not count, and `module.eval()`
is not `eval`)."""

import ast
from pathlib import Path

import pytest

import trl_nft


PACKAGE = Path(trl_nft.__file__).parent

# Modules whose loading functions unpickle (or, for marshal, load code objects).
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "marshal", "shelve"}
# yaml loaders that build only plain data.
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}
YAML_LOADS_NEEDING_A_LOADER = {"yaml.load", "yaml.load_all"}
UNSAFE_YAML_LOADS = {"yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all"}
CODE_RUNNERS = {"eval", "exec", "builtins.eval", "builtins.exec"}


def _imported_names(tree: ast.AST) -> dict[str, str]:
    """Local name -> the dotted name it is bound to by an import (`import torch as th`: th -> torch)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:  # `import a.b` binds `a`
                    root = alias.name.partition(".")[0]
                    names[root] = root
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST, names: dict[str, str]) -> str | None:
    """The dotted name an expression refers to (`th.load` -> "torch.load"), or None if it is not a plain name."""
    if isinstance(node, ast.Name):
        return names.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, names)
        return f"{base}.{node.attr}" if base else None
    return None


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((keyword.value for keyword in call.keywords if keyword.arg == name), None)


def find_unsafe_code(source: str, filename: str = "<source>") -> list[str]:
    """`file:line: what` for each unsafe construct in `source`."""
    tree = ast.parse(source, filename)
    names = _imported_names(tree)
    found = []

    def report(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for module in modules:
                if module.partition(".")[0] in UNSAFE_MODULES and not getattr(node, "level", 0):
                    report(node, f"imports {module}")
        elif isinstance(node, ast.Call):
            function = _dotted(node.func, names)
            if function in CODE_RUNNERS:
                report(node, f"calls {function}")
            elif function == "torch.load":
                weights_only = _keyword(node, "weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    report(node, "calls torch.load without weights_only=True")
            elif function in UNSAFE_YAML_LOADS:
                report(node, f"calls {function}")
            elif function in YAML_LOADS_NEEDING_A_LOADER:
                loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                loader_name = _dotted(loader, names) if loader is not None else None
                if loader_name is None or loader_name.rpartition(".")[2] not in SAFE_YAML_LOADERS:
                    report(node, f"calls {function} without a safe Loader")
    return found


def test_the_package_has_no_unsafe_code():
    files = sorted(PACKAGE.rglob("*.py"))
    assert PACKAGE / "rewards" / "server.py" in files and len(files) > 20  # the walk does reach the package
    found = [line for path in files for line in find_unsafe_code(path.read_text(), str(path.relative_to(PACKAGE)))]
    assert found == []


@pytest.mark.parametrize(
    "source, what",
    [
        ("import pickle", "imports pickle"),
        ("import cPickle as p", "imports cPickle"),
        ("from dill import loads", "imports dill"),
        ("import marshal", "imports marshal"),
        ("from joblib import load", "imports joblib"),
        ("import torch\ntorch.load(path)", "torch.load without weights_only=True"),
        ("import torch as th\nth.load(path, weights_only=False)", "torch.load without weights_only=True"),
        ("from torch import load\nload(path, map_location='cpu')", "torch.load without weights_only=True"),
        ("eval(text)", "calls eval"),
        ("exec(code, {})", "calls exec"),
        ("import builtins\nbuiltins.eval(text)", "calls builtins.eval"),
        ("import yaml\nyaml.load(stream)", "yaml.load without a safe Loader"),
        ("import yaml\nyaml.load(stream, Loader=yaml.Loader)", "yaml.load without a safe Loader"),
        ("import yaml\nyaml.load(stream, yaml.UnsafeLoader)", "yaml.load without a safe Loader"),
        ("import yaml\nyaml.unsafe_load(stream)", "calls yaml.unsafe_load"),
        ("from yaml import full_load\nfull_load(stream)", "calls yaml.full_load"),
    ],
)
def test_the_check_finds_each_unsafe_construct(source, what):
    found = find_unsafe_code(source)
    assert len(found) == 1 and what in found[0]


def test_the_check_accepts_the_safe_forms():
    source = """
import torch
import yaml
from yaml import SafeLoader

model.eval()                                   # a module's eval mode, not the builtin
torch.load(path, map_location="cpu", weights_only=True)
yaml.safe_load(stream)
yaml.load(stream, Loader=yaml.SafeLoader)
yaml.load(stream, SafeLoader)
text = "import pickle; eval(x)"                # mentioned in a string only
"""
    assert find_unsafe_code(source) == []
