"""The OpenAI-compatible engine: chat completions from `vllm serve`, SGLang, llama.cpp's server
or a hosted API, over one or more base URLs per model.

The client is httpx's `AsyncClient`, not the `openai` package: the engine needs each answer's
own status code and `Retry-After` header (they drive the concurrency limit and the pauses),
retries that are its own (the openai client retries quietly, which would hide the overload
signals and double the retry budget), and connection limits that match its limits on
requests in flight. httpx gives exactly that, and nothing runs that the engine cannot see.

What it does, per request: routes the step to its model (`step_models`, else `model_name`)
and that model's pool of endpoints (`pool`); waits for a slot under the endpoint's AIMD limit
(`aimd`); posts `/chat/completions`; and sorts the outcome:

- an answer: the completion, its token counts from `usage`;
- transient (refused or reset connection, protocol error, timeout, 408, 429, 5xx, an answer
  aborted by a stopping server): retried with backoff and jitter (`backoff`) until
  `openai.retry_deadline` seconds after the first failure, or as soon as a pool that had
  stopped answering answers again; 429, 503 and timeouts also halve the endpoint's limit,
  and `Retry-After` pauses it. The completion says how many retries it took;
- rejected (400, 413, 422...: a prompt longer than the context, say): `RequestError`, with the
  server's message; the pipeline drops that record as `<step>_failed`;
- 401, 403, 404 (the key was revoked, the model is gone): `EngineDead`, since every other
  request would fail the same way and be dropped;
- a pool that stays unreachable past the deadline: `EngineDead`; the chunk goes back to the
  queue. Only a request that keeps getting a server error while the pool answers others
  fails alone, as a `RequestError`.

The chat template is the server's: it receives messages, not tokens, and
`chat_template_kwargs` are passed in the body as vLLM and SGLang accept them. The judge's
choices are enforced by the server (`constraint`). `choice_probabilities` stays None: the
chat API's log-probabilities are not read (a judge's `yes_probability` is then absent, as for
any engine without them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from ..errors import ConfigError
from . import constraint
from .aimd import Aimd
from .backoff import BASE_SECONDS, CAP_SECONDS, backoff_delay, retry_after
from .base import Completion, EngineDead, Request, RequestError, Step
from .pool import Endpoint, EndpointStats, Lease, Pool
from .servercheck import EndpointError, check_endpoint, connect_reason

if TYPE_CHECKING:
    from ..config import Config, OpenAISettings

log = logging.getLogger(__name__)

STEPS: tuple[Step, ...] = ("width", "judge", "fix", "depth", "flatten", "answer")
# Request body fields the engine sets itself: `engine_kwargs` (extra fields for every request,
# such as vLLM's `top_k` or `min_p`) may not replace them.
OWN_FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "seed",
        "n",
        "stream",
        "repetition_penalty",
        "chat_template",
        "chat_template_kwargs",
        "structured_outputs",
        "guided_choice",
        "response_format",
    }
)
# Not this request's fault nor the server's load: the key or the model is gone for everyone.
FATAL_STATUS = frozenset({401, 403, 404})
OVERLOAD_STATUS = {429: "rate_limited", 503: "unavailable", 408: "timeout"}
MESSAGE_CHARS = 500  # of a server's error message, in a trace


def check_arguments(engine_kwargs: dict[str, Any], hardware_kwargs: dict[str, Any]) -> None:
    """`engine_kwargs` are extra fields of every request body (they shape the data, and are
    in the fingerprint); the fields the engine sets are refused there. `hardware_kwargs`
    has nothing to set: this machine's settings are the `openai` section."""
    for key in engine_kwargs:
        if key in OWN_FIELDS:
            raise ConfigError(
                f"engine_kwargs.{key}: engine openai sets this field itself "
                "(see docs/engines.md, 'The OpenAI-compatible engine')"
            )
    for key in hardware_kwargs:
        raise ConfigError(
            f"hardware_kwargs.{key}: engine openai takes no hardware_kwargs "
            "(this machine's settings are the openai section)"
        )


@dataclass
class Route:
    """Where one step's requests go: its model, that model's pool, and for the judge how
    the pool's servers are held to the choices (decided in `start`)."""

    model: str
    pool: Pool
    mode: constraint.Mode = "structured_outputs"


@dataclass
class _Tries:
    """One request's tries so far: since when it has been failing (None: it has not), its
    last failure, and how many times it was sent again."""

    failing_since: float | None = None
    last: _Transient | None = None
    retries: int = 0


class _Transient(Exception):
    """One try failed in a way another try may not: retried until the deadline."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _server_message(response: httpx.Response) -> str:
    """The error's own words: OpenAI's `{"error": {"message"}}`, vLLM's older
    `{"message"}`, or the start of the body."""
    try:
        data = response.json()
    except ValueError:
        data = None
    message: Any = None
    if isinstance(data, dict):
        error = data.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        message = message or data.get("message") or data.get("detail")
    text = str(message) if message else response.text.strip() or response.reason_phrase
    return " ".join(text.split())[:MESSAGE_CHARS]


def _api_key(env: str | None, where: str) -> str | None:
    if env is None:
        return None
    key = os.environ.get(env)
    if not key:
        raise ConfigError(f"{where}: ${env} is not set (it should hold the API key)")
    return key


class OpenAIEngine:
    """Chat completions from OpenAI-compatible servers, with per-endpoint adaptive
    concurrency and retries that never drop a record silently."""

    def __init__(self, config: Config) -> None:
        settings = config.openai
        self._settings = settings
        self._extra = dict(config.engine_kwargs)
        self._template_kwargs = dict(config.chat_template_kwargs)
        self._endpoints: dict[str, Endpoint] = {}
        self._dead: str | None = None
        self._closed = False
        self._closing: list[asyncio.Task[None]] = []
        logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
        pools: dict[str, Pool] = {}
        self._routes: dict[str, Route] = {}
        for step in STEPS:
            model = config.step_models.get(step, config.model_name)
            if model not in pools:
                pools[model] = self._pool(settings, model, pools)
            self._routes[step] = Route(model, pools[model])
        if settings.judge_constraint != "auto":
            self._routes["judge"].mode = settings.judge_constraint

    def _pool(self, settings: OpenAISettings, model: str, pools: dict[str, Pool]) -> Pool:
        """The pool serving `model`: its own (`openai.models`), else the shared one."""
        served = settings.models.get(model)
        label = f"openai.models.{model}.endpoints" if served else "openai.endpoints"
        urls, key_env = (
            (served.endpoints, served.api_key_env)
            if served
            else (settings.endpoints, settings.api_key_env)
        )
        for pool in pools.values():
            if pool.label == label:
                return pool
        endpoints = [self._endpoint(url, key_env, label) for url in urls]
        return Pool(label, endpoints)

    def _endpoint(self, url: str, key_env: str | None, where: str) -> Endpoint:
        """One endpoint per URL, whichever pools list it: its limit is the server's."""
        known = self._endpoints.get(url)
        if known is not None:
            if known.key_env != key_env:
                raise ConfigError(f"{where}: {url} is listed elsewhere with another api_key_env")
            return known
        settings = self._settings
        key = _api_key(key_env, where.removesuffix(".endpoints") + ".api_key_env")
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.request_timeout, connect=settings.connect_timeout),
            limits=httpx.Limits(
                max_connections=settings.max_in_flight,
                max_keepalive_connections=settings.max_in_flight,
            ),
            headers={"Authorization": f"Bearer {key}"} if key else None,
        )
        aimd = Aimd.starting(settings.initial_in_flight, settings.max_in_flight)
        endpoint = Endpoint(url, client, aimd, key_env)
        self._endpoints[url] = endpoint
        return endpoint

    # --- start-up ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Check every endpoint and the models each serves, then find how the judge's pool
        holds an answer to its choices. A bad URL, key or model name is one line here, before
        any record starts."""
        wanted: dict[str, list[str]] = {}
        labels: dict[str, str] = {}
        for route in self._routes.values():
            for endpoint in route.pool.endpoints:
                models = wanted.setdefault(endpoint.url, [])
                if route.model not in models:
                    models.append(route.model)
                labels.setdefault(endpoint.url, route.pool.label)
        await asyncio.gather(
            *(
                check_endpoint(
                    self._endpoints[url], models, labels[url], self._settings.startup_wait
                )
                for url, models in wanted.items()
            )
        )
        if self._settings.judge_constraint == "auto":
            await self._choose_constraint(self._routes["judge"])

    async def _choose_constraint(self, route: Route) -> None:
        for mode in constraint.MODES:
            try:
                data, _ = await self._post(route.pool, constraint.probe_body(route.model, mode))
            except RequestError:
                continue  # the server refused the field
            text = constraint.answer(mode, _content(data))
            if text in constraint.PROBE_CHOICES:
                route.mode = mode
                log.info("openai: the judge's answers are held by %s (%s)", mode, route.pool.urls)
                return
        raise EndpointError(
            f"{route.pool.label}: {route.pool.urls} does not hold model {route.model!r} to a "
            "judge's choices (tried structured_outputs, guided_choice and a json_schema "
            "response_format); the judge cannot be constrained there"
        )

    # --- requests ---------------------------------------------------------------------------
    async def complete(self, request: Request) -> Completion:
        if self._closed:
            raise EngineDead("the openai engine was closed")
        if self._dead is not None:
            raise EngineDead(self._dead)
        route = self._routes[request.step]
        data, retries = await self._post(route.pool, self._body(request, route))
        return _completion(data, request, route.mode, retries)

    def _body(self, request: Request, route: Route) -> dict[str, Any]:
        body: dict[str, Any] = {
            **self._extra,
            "model": route.model,
            "messages": [message.as_dict() for message in request.messages],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "seed": request.seed,
            "n": 1,
        }
        if request.repetition_penalty != 1.0:  # a vLLM/SGLang extension: only when used
            body["repetition_penalty"] = request.repetition_penalty
        if self._template_kwargs:
            body["chat_template_kwargs"] = self._template_kwargs
        if request.choices:
            body.update(constraint.constraint_fields(route.mode, request.choices))
            body["max_tokens"] = constraint.min_tokens(route.mode, request.max_tokens)
        return body

    async def _post(self, pool: Pool, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """The answer to `body` from `pool` and how many retries it took, retrying transient
        failures until the deadline. A `RequestError` carries the retries spent on it."""
        tries = _Tries()
        while True:
            lease = await self._acquire(pool, tries)
            try:
                return await self._attempt(lease, body), tries.retries
            except RequestError as exc:
                exc.retries = tries.retries
                raise
            except _Transient as exc:
                lease.endpoint.errors[exc.kind] += 1
                delay = self._retry_in(pool, tries, exc)
                lease.endpoint.retries += 1
                log.info(
                    "openai: %s failed (%s: %s); retry %d in %.1f s",
                    lease.endpoint.url,
                    exc.kind,
                    exc,
                    tries.retries,
                    delay,
                )
                assert tries.failing_since is not None
                await pool.backoff(delay, tries.failing_since)

    def _retry_in(self, pool: Pool, tries: _Tries, exc: _Transient) -> float:
        """Seconds until the next try of a request that just failed with `exc`, counted as a
        retry; past the deadline, the error `_give_up` chooses is raised instead."""
        now = time.monotonic()
        tries.last = exc
        tries.failing_since = now if tries.failing_since is None else tries.failing_since
        deadline = tries.failing_since + self._settings.retry_deadline
        if now >= deadline:
            raise self._give_up(pool, tries) from None
        tries.retries += 1
        return min(backoff_delay(tries.retries), deadline - now)

    async def _acquire(self, pool: Pool, tries: _Tries) -> Lease:
        """A slot in the pool. Waiting for one is not failing (a busy pool queues requests);
        once a request has failed, it waits no longer than its deadline."""
        if self._dead is not None:
            raise EngineDead(self._dead)
        if tries.failing_since is None:
            return await pool.acquire()
        lease = pool.try_acquire()  # the last try, at the deadline, still gets a free slot
        if lease is not None:
            return lease
        left = tries.failing_since + self._settings.retry_deadline - time.monotonic()
        try:
            return await asyncio.wait_for(pool.acquire(), max(left, 0.0))
        except asyncio.TimeoutError:
            raise self._give_up(pool, tries) from None

    def _give_up(self, pool: Pool, tries: _Tries) -> Exception:
        """Past the deadline. While the pool answered other requests meanwhile, a server
        error is this request's own (a prompt that crashes the server): it fails alone.
        Otherwise the pool is gone, and so is the engine."""
        seconds, exc = self._settings.retry_deadline, tries.last
        assert exc is not None and tries.failing_since is not None
        if exc.kind == "server_error" and pool.last_success > tries.failing_since:
            return RequestError(
                f"the server kept failing this request for {seconds:g} s: {exc}",
                retries=tries.retries,
            )
        self._dead = (
            f"{pool.label}: {pool.urls} failed every try for {seconds:g} s "
            f"(openai.retry_deadline); last: {exc.kind}: {exc}"
        )
        return EngineDead(self._dead)

    async def _attempt(self, lease: Lease, body: dict[str, Any]) -> dict[str, Any]:
        """One try on one endpoint; the lease ends here, whatever happens."""
        endpoint = lease.endpoint
        endpoint.requests += 1
        try:
            response = await endpoint.client.post(f"{endpoint.url}/chat/completions", json=body)
        except httpx.ConnectTimeout as exc:
            lease.refused(_refusal_pause(endpoint.refusals))
            raise _Transient("connect", f"connection timed out ({exc})") from None
        except httpx.TimeoutException as exc:
            lease.overloaded()
            raise _Transient("timeout", f"no answer in time ({type(exc).__name__})") from None
        except httpx.ConnectError as exc:
            lease.refused(_refusal_pause(endpoint.refusals))
            raise _Transient("connect", connect_reason(exc)) from None
        except httpx.TransportError as exc:
            lease.failed()
            raise _Transient("dropped", f"{type(exc).__name__}: {exc}") from None
        except BaseException:
            lease.failed()  # cancelled (a chunk abandoned): the slot is free again
            raise
        return self._answer(lease, response)

    def _answer(self, lease: Lease, response: httpx.Response) -> dict[str, Any]:
        status = response.status_code
        if status == 200:
            try:
                data = response.json()
                tokens = _completion_tokens(data)
                finish = data["choices"][0].get("finish_reason")
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                lease.failed()
                lease.endpoint.errors["bad_response"] += 1
                raise RequestError(
                    f"{lease.endpoint.url} answered 200 without a chat completion: "
                    f"{response.text[:MESSAGE_CHARS]!r}"
                ) from None
            if finish == "abort":  # a stopping server cut it off: never a record
                lease.failed()
                raise _Transient("dropped", "the server aborted the request")
            lease.succeeded(tokens)
            return data
        message = f"HTTP {status}: {_server_message(response)}"
        if status in OVERLOAD_STATUS:
            lease.overloaded(retry_after(response.headers.get("retry-after")))
            raise _Transient(OVERLOAD_STATUS[status], message)
        lease.failed()
        if status >= 500:
            raise _Transient("server_error", message)
        lease.endpoint.errors["rejected"] += 1
        if status in FATAL_STATUS:
            self._dead = f"{lease.endpoint.url} refused the engine: {message}"
            raise EngineDead(self._dead)
        raise RequestError(f"{lease.endpoint.url} rejected the request: {message}")

    # --- the rest of the contract -----------------------------------------------------------
    def stats(self) -> dict[str, EndpointStats]:
        """Each endpoint's limit, requests in flight, retries and errors, by URL."""
        return {url: endpoint.stats() for url, endpoint in self._endpoints.items()}

    def close(self) -> None:
        """Refuse further requests and close the clients' connections. Safe to call twice.
        Closing needs the event loop: called on it, the clients close as soon as it runs
        again; `aclose` waits for them."""
        if self._closed:
            return
        self._closed = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: the sockets close with the process
        self._closing = [loop.create_task(e.client.aclose()) for e in self._endpoints.values()]

    async def aclose(self) -> None:
        """`close`, waiting until every connection is closed."""
        if not self._closed:
            self._closed = True
            await asyncio.gather(*(e.client.aclose() for e in self._endpoints.values()))
        else:
            await asyncio.gather(*self._closing)


def _refusal_pause(refusals: int) -> float:
    """How long an endpoint that refused `refusals` connections in a row (before this one)
    is left alone: doubling, like a request's backoff, without its jitter."""
    return min(CAP_SECONDS, BASE_SECONDS * 2**refusals)


def _content(data: dict[str, Any]) -> str:
    content = data["choices"][0].get("message", {}).get("content")
    return content if isinstance(content, str) else ""


def _completion_tokens(data: dict[str, Any]) -> int:
    """Generated tokens from `usage` (0 when a server leaves it out); checks the shape."""
    if not isinstance(data["choices"][0].get("message", {}), dict):
        raise TypeError("message is not an object")
    usage = data.get("usage") or {}
    return int(usage.get("completion_tokens") or 0)


def _completion(
    data: dict[str, Any], request: Request, mode: constraint.Mode, retries: int
) -> Completion:
    choice = data["choices"][0]
    text = _content(data)
    if request.choices:
        text = constraint.answer(mode, text)
    usage = data.get("usage") or {}
    return Completion(
        text=text,
        finish_reason=choice.get("finish_reason"),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        retries=retries,
    )
