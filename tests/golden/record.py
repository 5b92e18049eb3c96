"""Re-record the golden outputs in tests/golden/expected/.

Run only to re-record after an intended change of output, and say in the commit what changed
and why: `tests/test_golden.py` exists to catch every change nobody intended. From the
repository root:

    PYTHONPATH=$PWD .venv/bin/python -m tests.golden.record
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from .cases import EXPECTED, clear, produce


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="zoi-golden-") as folder:
        outputs = produce(Path(folder).resolve())
    clear(EXPECTED)
    for name, data in sorted(outputs.items()):
        path = EXPECTED / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    total = sum(len(data) for data in outputs.values())
    print(f"recorded {len(outputs)} files, {total:,} bytes, in {EXPECTED}", file=sys.stderr)


if __name__ == "__main__":
    main()
