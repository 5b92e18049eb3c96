"""Starting this package's own Python processes without the working directory on the import
path: `python -m` puts it first, so a `yaml.py` (or `psutil.py`) there would replace the real
library in the child, and a writable working directory would run anyone's code."""

from __future__ import annotations

import sys

_WITHOUT_CWD = (
    "import runpy, sys; del sys.path[0]; "
    "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)"
)


def python_module(module: str, version: tuple[int, int] | None = None) -> list[str]:
    """`python -m module` without the working directory on the import path; PYTHONPATH
    keeps working (unlike `-I`). Python 3.11+ has `-P` for this; on 3.10 a one-line bootstrap
    drops the entry before anything else is imported."""
    if (version or sys.version_info[:2]) >= (3, 11):
        return [sys.executable, "-P", "-m", module]
    return [sys.executable, "-c", _WITHOUT_CWD, module]
