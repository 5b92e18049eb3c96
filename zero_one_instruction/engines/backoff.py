"""When to try a failed request again: exponential backoff with full jitter, and the
server's own `Retry-After`.

Full jitter (a uniform wait between zero and the exponential bound) spreads the retries of
many requests that failed together, so they do not return together and fail together again.
The random source need not be seeded: a retry's timing never changes what is generated.
"""

from __future__ import annotations

import random
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

BASE_SECONDS = 0.5
CAP_SECONDS = 30.0
# The bound stops doubling well past the cap: a request retried for hours (a pool that keeps
# answering others) must not reach a power of two too large for a float.
MAX_DOUBLINGS = 32
# A Retry-After further out than this is read as this: a server asking for an hour of
# silence should not stall a worker past every deadline without a word.
MAX_RETRY_AFTER = 300.0


def backoff_delay(attempt: int, rng: random.Random | None = None) -> float:
    """The wait before retry number `attempt` (1 for the first), in seconds."""
    bound = min(CAP_SECONDS, BASE_SECONDS * 2 ** min(MAX_DOUBLINGS, max(0, attempt - 1)))
    return (rng or random).uniform(0.0, bound)


def retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header: a number of seconds or an HTTP date.
    None when absent or unreadable (then the backoff alone decides)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return min(MAX_RETRY_AFTER, max(0.0, seconds))
