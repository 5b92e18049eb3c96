"""Golden outputs: every command, run today on fixed inputs with the scripted engine, must write
exactly the bytes recorded in tests/golden/expected/ (see tests/golden/cases.py for what is
run, and which few fields are normalised). A difference is a change of behaviour: find its
cause, or, if it is intended, re-record with `python -m tests.golden.record` and say why."""

from __future__ import annotations

import pytest

from .golden.cases import EXPECTED, produce

RECORDED = sorted(p.relative_to(EXPECTED).as_posix() for p in EXPECTED.rglob("*") if p.is_file())
SHOWN = 160  # characters of a differing line shown on each side of the first difference


@pytest.fixture(scope="module")
def produced(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return produce(tmp_path_factory.mktemp("golden").resolve())


def _excerpt(line: bytes | None, at: int) -> str:
    if line is None:
        return "(the file ends before this line)"
    text = line.decode("utf-8", errors="backslashreplace")
    start = max(0, at - SHOWN)
    return ("..." if start else "") + repr(text[start : at + SHOWN])


def first_difference(name: str, expected: bytes, actual: bytes) -> str:
    """Which file, which line, and that line both ways, around the first differing character."""
    old, new = expected.splitlines(keepends=True), actual.splitlines(keepends=True)
    for number in range(1, max(len(old), len(new)) + 1):
        a = old[number - 1] if number <= len(old) else None
        b = new[number - 1] if number <= len(new) else None
        if a != b:
            break
    at = 0
    if a is not None and b is not None:
        old_text, new_text = (x.decode("utf-8", errors="backslashreplace") for x in (a, b))
        pairs = enumerate(zip(old_text, new_text, strict=False))  # the shorter one may end
        at = next((i for i, (x, y) in pairs if x != y), min(len(old_text), len(new_text)))
    return (
        f"tests/golden/expected/{name} differs from this run's output at line {number}"
        f" (character {at + 1}):\n  recorded: {_excerpt(a, at)}\n  now:      {_excerpt(b, at)}\n"
        "If the change is intended, re-record with `python -m tests.golden.record`."
    )


def test_every_output_is_recorded_and_every_recording_produced(produced) -> None:
    assert sorted(produced) == RECORDED, "re-record with `python -m tests.golden.record`"


@pytest.mark.parametrize("name", RECORDED)
def test_output_is_byte_identical_to_the_recording(produced, name: str) -> None:
    expected = (EXPECTED / name).read_bytes()
    actual = produced.get(name)
    assert actual is not None, f"tests/golden/expected/{name}: no longer produced"
    if actual != expected:
        pytest.fail(first_difference(name, expected, actual), pytrace=False)
