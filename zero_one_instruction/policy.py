"""How chunk jobs are retried and timed, and how often workers show they are alive.

These are plain numbers with no RQ behind them, so the command line can show them as its
defaults without loading the queue (`zoi --help` stays quick), and the producer, the
janitor, the workers and the launcher all take them from one place.
"""

from __future__ import annotations

from dataclasses import dataclass

# Seconds between a worker's heartbeats of its running chunks, and between janitor sweeps:
# the defaults of `zoi worker`, the workers `zoi run` starts, and the library calls.
HEARTBEAT_SECONDS = 10.0
SWEEP_SECONDS = 15.0


def default_heartbeat_ttl(interval: float) -> int:
    """How long a running chunk may go without a heartbeat before it counts as abandoned,
    for heartbeats every `interval` seconds: three missed beats and a margin, so a busy worker
    is not taken for a dead one. A worker's default, and what the launcher's janitor allows
    the workers it starts."""
    return int(3 * interval) + 5


@dataclass(frozen=True)
class JobPolicy:
    """How often a chunk is retried, how long it may run, and how long RQ keeps its result."""

    retries: int = 3
    timeout: int = 24 * 3600
    result_ttl: int = 24 * 3600
    failure_ttl: int = 7 * 24 * 3600
