"""Running the CLI in-process and checking the one-line error rule."""

from __future__ import annotations

import subprocess

from click.testing import CliRunner, Result

from zero_one_instruction.cli import main


def zoi(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def assert_one_line_error(
    result: Result | subprocess.CompletedProcess[str], *fragments: str, code: int = 2
) -> str:
    """Exit `code`, exactly one line on stderr naming every fragment, no traceback; for a
    command run in-process (`zoi` here) or as a process."""
    exit_code = result.exit_code if isinstance(result, Result) else result.returncode
    assert exit_code == code, (exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("zoi: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]
