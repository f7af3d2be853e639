"""Adds `nft` to TRL's command line, so that `trl nft ...` runs `trl-nft nft ...`.

TRL's CLI has no plugin mechanism: its commands are a fixed list returned by `trl.cli.commands.get_commands()`. The
file `trl_nft_trl_plugin.pth`, installed with trl-nft next to the other packages, imports this small module when
Python starts. It imports nothing else: it only installs an import hook that, when `trl.cli.commands` is imported (by
the `trl` command), appends an `nft` command to that list. TRL's own `trl` script is left untouched.

If a future TRL changes these internals, the hook steps aside and `trl nft` prints how to run `trl-nft nft` (the same
flags) instead of failing obscurely.
"""

import importlib.abc
import importlib.util
import sys


TARGET = "trl.cli.commands"
FALLBACK = "trl-nft could not add `nft` to this version of TRL's command line ({reason}); run `trl-nft nft {args}` instead: it takes the same flags."


class _AddNftCommand(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)  # one shot, and the real spec is found by the other finders
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader)
        return spec


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        try:
            _add_nft_command(module)
        except Exception as error:  # noqa: BLE001 - whatever changed in TRL, `trl` itself must keep working
            _explain_if_asked(f"{type(error).__name__}: {error}")


def _add_nft_command(commands_module) -> None:
    from trl.cli.commands.base import Command

    original_get_commands = commands_module.get_commands

    class NftCommand(Command):
        def __init__(self):
            super().__init__(name="nft", help_text="Run DiffusionNFT training of a diffusion model (trl-nft)")

        def register(self, subparsers) -> None:
            subparsers.add_parser(self.name, help=self.help_text, add_help=False)

        def run(self, args, context) -> int:
            from trl_nft.cli import main

            return main(["nft", *context.argv_after(self.name)])

    def get_commands():
        return [*original_get_commands(), NftCommand()]

    commands_module.get_commands = get_commands


def _explain_if_asked(reason: str) -> None:
    if sys.argv[1:2] == ["nft"]:
        sys.exit(FALLBACK.format(reason=reason, args=" ".join(sys.argv[2:])))


def install() -> None:
    """Install the hook (idempotent); called by the `.pth` file at start-up."""
    if TARGET not in sys.modules and not any(isinstance(finder, _AddNftCommand) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AddNftCommand())
