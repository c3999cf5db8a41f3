"""Only what pyproject.toml cannot say: an editable build writes the source tree's path into the launchers.

The launchers (launchers/, installed as script-files) find client_shim in site-packages with one stat.  After
`pip install -e .` it is not there: setuptools maps it to this tree through a finder module, which the launcher
would have to find and read on every kubectl call (about 0.3 ms, a twentieth of the interpreter's start; bench/run
section 7).  setuptools tells build commands that the build is editable (``editable_mode``), so build_scripts can
write the path it already knows, as a Python literal, into the one line made for it.  Any other build copies the
launchers as they are.
"""

from __future__ import annotations

import os
import sys

from setuptools import Distribution, setup

build_scripts = Distribution().get_command_class("build_scripts")  # distutils' own: setuptools has no subclass

ROOT = os.path.dirname(os.path.abspath(__file__))
MARK = "_pkg = _site\n"  # the line in launchers/* an editable build replaces


def bake(text: str, root: str, version: tuple[int, int] = (sys.version_info[0], sys.version_info[1])) -> str:
    """The launcher ``text`` with client_shim's parent directory ``root`` written into its one marked line, taken
    only by the Python minor ``version`` it was installed with (the build runs on the target interpreter)."""
    if text.count(MARK) != 1:
        raise RuntimeError(f"launchers: expected exactly one line {MARK.strip()!r} to write the source path into")
    line = f"_pkg = {root!r} if sys.version_info[:2] == {tuple(version)!r} else _site  # written by setup.py\n"
    return text.replace(MARK, line)


class BuildScripts(build_scripts):
    editable_mode = False  # set to True by setuptools' editable_wheel

    def run(self) -> None:
        super().run()
        if not self.editable_mode or not os.path.isfile(os.path.join(ROOT, "client_shim", "core.py")):
            return
        if str(getattr(self.get_finalized_command("editable_wheel"), "mode", "") or "").lower() == "strict":
            return  # strict mode maps the package to a tree of links (new files need a reinstall): the finder says
        for script in self.scripts or ():
            built = os.path.join(self.build_dir, os.path.basename(script))
            with open(built, encoding="utf-8") as f:
                text = f.read()
            if MARK in text:
                with open(built, "w", encoding="utf-8") as f:
                    f.write(bake(text, ROOT))


if __name__ == "__main__":  # as setuptools' build backend runs it; tests import bake()
    setup(cmdclass={"build_scripts": BuildScripts})
