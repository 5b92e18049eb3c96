"""The Redis connection of one command: a URL the user gives, or the run's embedded server.

Redis only distributes work; finished work lives in the run directory. A URL is checked, and
its password kept out of every message, before redis-py sees it: redis-py would misread some
URLs silently or fail on them with a bare exception. Without a URL, the run gets its own
server (`embeddedredis`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

import redis

from .brokererrors import BrokerEnvironmentError, BrokerError, refusal
from .embeddedredis import client_name, embedded, release

SCHEMES = ("redis", "rediss", "unix")
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&]*", re.IGNORECASE)


def redact(url: str) -> str:
    """The URL with any password replaced, for messages and logs: in the user-info part and
    in a `password=` query parameter (redis-py accepts both).

    Done on the text, without parsing it first: a password holding `/`, `?`, `#` or `@`
    confuses a URL parser about where the user-info ends, and a parse error must not be
    what shows it. The user-info is everything up to the last `@`; when in doubt this hides
    too much, never too little. The host is kept as written (IPv6 brackets included)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    rest = _redact_query(rest)
    userinfo, at, host = rest.rpartition("@")
    if at:
        shown_user = f"{userinfo.split(':', 1)[0]}:***" if ":" in userinfo else "***"
        rest = f"{shown_user}@{host}"
    return f"{scheme}{sep}{rest}"


def _redact_query(text: str) -> str:
    """Every `password=` parameter hidden up to the next `&`, wherever a `?` or `&` starts
    one: a `?` inside the user-info would make the first `?` the wrong place to look."""
    return _QUERY_PASSWORD.sub(r"\1***", text)


def check_url(url: str) -> None:
    """Refuse, in one line that never shows the password, what redis-py would misread or
    fail on with a bare exception: an unknown scheme, a port that is not a number, and a
    password whose `/`, `?` or `#` ends the host part early (redis-py would silently
    connect to localhost with part of the password as the database)."""
    shown = redact(url)
    scheme = url.partition("://")[0] if "://" in url else ""
    if scheme not in SCHEMES:
        raise BrokerError(
            f"--redis-url {shown}: unsupported scheme {scheme!r} (use redis://, "
            "rediss:// or unix://)"
        )
    if scheme == "unix":
        return
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise BrokerError(f"--redis-url {shown}: {exc}") from None
    if _misread(parts):
        raise BrokerError(
            f"--redis-url {shown}: not of the form redis://[[user]:password@]host[:port][/db]"
            "; percent-encode any '/', '?', '#' or '@' in the password (%2F, %3F, %23, %40)"
        )
    try:
        _ = parts.port  # parsing it is the check
    except ValueError:
        raise BrokerError(
            f"--redis-url {shown}: the port must be a number from 0 to 65535"
        ) from None
    if not parts.hostname:
        raise BrokerError(f"--redis-url {shown}: no host (redis://[:password@]host[:port][/db])")


def _misread(parts: SplitResult) -> bool:
    """Whether the parser saw something a Redis URL never has: a path that is not a
    database number, a fragment, a query word without `=`. Each is what the rest of a
    password looks like when its `/`, `#` or `?` ended the host part."""
    params = [param for param in parts.query.split("&") if param]
    return (
        not re.fullmatch(r"/?\d*", parts.path)
        or bool(parts.fragment)
        or not all("=" in param for param in params)
    )


def _ping(client: redis.Redis, shown: str) -> redis.Redis:
    try:
        client.ping()
    except redis.AuthenticationError:
        raise BrokerError(f"Redis at {shown}: authentication failed (check the password)") from None
    except redis.ResponseError as exc:
        raise refusal(exc, f"Redis at {shown}") or BrokerError(f"Redis at {shown}: {exc}") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise BrokerEnvironmentError(f"cannot reach Redis at {shown} ({exc})") from None
    return client


def from_url(url: str, role: str) -> redis.Redis:
    check_url(url)
    shown = redact(url)
    try:
        client = redis.Redis.from_url(
            url, client_name=client_name(role), socket_connect_timeout=10, health_check_interval=30
        )
    except ValueError as exc:
        raise BrokerError(f"--redis-url {shown}: {exc}") from None
    return _ping(client, shown)


@contextmanager
def connect(url: str | None, run_path: Path, role: str) -> Iterator[redis.Redis]:
    """Redis for one command: the URL's server, or the run's embedded one."""
    if url:
        client = from_url(url, role)
        try:
            yield client
        finally:
            client.close()
        return
    client = embedded(run_path, role)
    try:
        yield client
    finally:
        release(client, run_path)
