"""The start-up check of an OpenAI-compatible endpoint: `GET {base}/models` with the key.

It turns each way an endpoint can be unusable into one line that names the setting to fix,
before any record starts: a worker with a wrong URL or key should stop at once with exit 2,
not retry for ten minutes and then return every chunk it took. The key is never shown; the
variable that holds it is named instead.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from typing import TYPE_CHECKING, Any

import httpx

from ..errors import ZoiError
from .pool import clock

if TYPE_CHECKING:
    from .pool import Endpoint

# Statuses a server gives while it loads a model: waited out within `startup_wait`.
NOT_READY = frozenset({502, 503, 504})
POLL_SECONDS = 1.0
SHOWN_MODELS = 10


class EndpointError(ZoiError):
    """An endpoint cannot be used at start-up: unreachable, a refused key, a model it does
    not serve, or not an OpenAI-compatible server. Checked before any chunk is taken."""


async def check_endpoint(endpoint: Endpoint, models: list[str], label: str, wait: float) -> None:
    """Raise `EndpointError` unless `endpoint` answers `/models` with every one of `models`.
    A refused connection or a server still loading is retried for `wait` seconds."""
    url = endpoint.url
    deadline = clock() + wait
    while True:
        problem, response = await _get_models(endpoint)
        retry = problem is not None or (response is not None and response.status_code in NOT_READY)
        if not retry or clock() >= deadline:
            break
        await asyncio.sleep(min(POLL_SECONDS, max(0.0, deadline - clock())))
    if problem is not None:
        raise EndpointError(f"{label}: {url} {problem}")
    assert response is not None
    served = _served_models(endpoint, response, label)
    for model in models:
        if model not in served:
            shown = ", ".join(served[:SHOWN_MODELS]) + (
                " ..." if len(served) > SHOWN_MODELS else ""
            )
            raise EndpointError(
                f"{label}: {url} does not serve model {model!r} (it serves: {shown or 'none'})"
            )


async def _get_models(endpoint: Endpoint) -> tuple[str | None, httpx.Response | None]:
    """The answer to `GET /models`, or why there is none (as the end of a sentence)."""
    try:
        return None, await endpoint.client.get(f"{endpoint.url}/models")
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        return f"unreachable ({connect_reason(exc)})", None
    except httpx.TimeoutException:
        return "unreachable (no answer in time; see openai.request_timeout)", None
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
        return "is not an OpenAI-compatible server (it does not answer HTTP)", None
    except httpx.HTTPError as exc:
        return f"unreachable ({type(exc).__name__}: {connect_reason(exc)})", None


def connect_reason(exc: BaseException) -> str:
    """Why a connection failed, in the system's words where the cause has them ("Connection
    refused", "Name or service not known"), not the client's ("All connection attempts
    failed"). A TLS failure is named as one: its errno (1) would read "Operation not
    permitted"."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return tls_reason(cause)
        if isinstance(cause, OSError) and cause.errno is not None:
            # asyncio words a refusal "Connect call failed (...)": the errno's own text is
            # plainer; a resolver error's errno is negative and has no text of its own.
            return os.strerror(cause.errno) if cause.errno > 0 else str(cause.strerror)
        cause = cause.__cause__ or cause.__context__
    return " ".join(str(exc).split()) or type(exc).__name__


def tls_reason(exc: ssl.SSLError) -> str:
    """A TLS failure in a few words: an untrusted certificate says why ("self-signed
    certificate", "certificate has expired") and where trust comes from."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS certificate not trusted: {exc.verify_message or exc.reason}; a private CA's "
            "certificate can be named in $SSL_CERT_FILE"
        )
    reason = exc.reason or exc.strerror or type(exc).__name__
    if reason == "WRONG_VERSION_NUMBER":  # a plain HTTP answer to the TLS greeting
        return f"TLS failed: {reason}; the server may speak http, not https"
    return f"TLS failed: {reason}"


def _served_models(endpoint: Endpoint, response: httpx.Response, label: str) -> list[str]:
    url, status = endpoint.url, response.status_code
    if status in (401, 403):
        if endpoint.key_env is None:
            raise EndpointError(
                f"{label}: {url} wants an API key (HTTP {status}); name the variable that "
                f"holds it in {label.removesuffix('.endpoints')}.api_key_env"
            )
        raise EndpointError(f"{label}: {url} rejected the API key from ${endpoint.key_env}")
    if status != 200:
        raise EndpointError(
            f"{label}: {url} is not an OpenAI-compatible server (GET {url}/models answered "
            f"HTTP {status})"
        )
    try:
        data: Any = response.json()
        return [str(entry["id"]) for entry in data["data"]]
    except (ValueError, KeyError, TypeError):
        raise EndpointError(
            f"{label}: {url} is not an OpenAI-compatible server (GET {url}/models is not a "
            "list of models)"
        ) from None
