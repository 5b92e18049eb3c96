"""The engine host's cold stop (`cancel_all`): every chunk in flight is abandoned, and so is
one handed over after it began, whose job thread was a step behind the stop; `close` lets
the abandoned chunks unwind before the loop stops."""

from __future__ import annotations

import concurrent.futures
import threading
import warnings
from pathlib import Path

import pytest

from zero_one_instruction.config import load_config
from zero_one_instruction.enginehost import EngineHost
from zero_one_instruction.rundir import Chunk, create_or_open

from .queue_helpers import scripted_config


def test_a_cold_stop_abandons_the_chunks_in_flight_and_any_handed_over_later(
    tmp_path: Path,
) -> None:
    config = scripted_config(tmp_path, delay=5, unwind=0.5)  # a cancelled request: 0.5 s
    run = create_or_open(tmp_path / "run", load_config(config), 0, 8, 4)
    host = EngineHost(run)
    try:
        started = threading.Event()
        first = host.submit(host.evolve_chunk(Chunk(0, 4), started))
        assert started.wait(10)  # its records are in the engine, each waiting 5 s
        host.cancel_all()
        with pytest.raises(concurrent.futures.CancelledError):
            first.result(timeout=10)
        late = host.evolve_chunk(Chunk(4, 8), threading.Event())
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a coroutine left unawaited would warn
            with pytest.raises(concurrent.futures.CancelledError):
                host.submit(late)
        assert late.cr_frame is None  # closed, never run
    finally:
        host.close()
    assert host.engine.in_flight == 0  # every request withdrawn (half a second each)
