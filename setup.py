"""Ships `trl_nft_trl_plugin.pth`, which makes `trl nft` work (see `trl_nft_trl_plugin.py`).

Everything else about the package is in pyproject.toml. setuptools has no option for a `.pth` file at the top of
site-packages, so the regular and the editable wheel builds each get one line that adds it.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel


PTH_NAME = "trl_nft_trl_plugin.pth"
PTH_LINE = "import trl_nft_trl_plugin; trl_nft_trl_plugin.install()\n"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        with open(os.path.join(self.build_lib, PTH_NAME), "w") as file:
            file.write(PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH_NAME)]


class _StrategyWithPth:
    """Wraps an editable-install strategy of setuptools so that the editable wheel also holds the `.pth` file."""

    def __init__(self, strategy):
        self.strategy = strategy

    def __enter__(self):
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc_info):
        return self.strategy.__exit__(*exc_info)

    def __call__(self, wheel, files, mapping):
        self.strategy(wheel, files, mapping)
        wheel.writestr(PTH_NAME, PTH_LINE)


class EditableWheelWithPth(editable_wheel):
    def _select_strategy(self, *args, **kwargs):
        return _StrategyWithPth(super()._select_strategy(*args, **kwargs))


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
