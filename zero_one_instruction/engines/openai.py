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
  aborted by a stopping server, a 200 that is no readable completion): retried with backoff
  and jitter (`backoff`), on another endpoint of the pool where one has room; 429 and 503
  also shrink the endpoint's limit (`aimd`), timeouts and 408 halve it, and `Retry-After`
  pauses it; a refused or dropped
  connection and a server error pause it too, longer each time (`pool`);
- rejected (400, 413, 422...: a prompt longer than the context, say): `RequestError`, with the
  server's message; the pipeline drops that record as `<step>_failed`;
- 401, 403, 404 (the key was revoked, the model is gone): `EngineDead`, since every other
  request would fail the same way and be dropped;
- given up (`_Failing`) only `openai.retry_deadline` seconds after a request first failed, and
  then by what the pool as a whole did meanwhile: a pool that answered nothing is gone
  (`EngineDead`: the chunk goes back to the queue); a pool that answers others while this
  request keeps failing on its own (a server error, a timeout, a dropped connection) fails
  this record alone (`RequestError`); a pool that answers others while it refuses this one
  for load (429, 503) or one of its endpoints cannot be reached is retried for as long as
  that lasts. Waiting for a slot in a busy pool is not failing: that time is off the
  request's clock.

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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from ..errors import ConfigError
from . import constraint, serverqueue
from .aimd import Aimd
from .backoff import BASE_SECONDS, CAP_SECONDS, MAX_DOUBLINGS, backoff_delay, retry_after
from .base import Completion, EngineDead, Request, RequestError, Step
from .pool import Endpoint, EndpointStats, Lease, Pool, clock
from .servercheck import EndpointError, check_endpoint, connect_reason

if TYPE_CHECKING:
    from ..config import Config, OpenAISettings

log = logging.getLogger(__name__)

STEPS: tuple[Step, ...] = ("width", "judge", "fix", "depth", "flatten", "answer", "follow_up")
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
# Failures that may be the request's own (a prompt that crashes the server, that always runs
# past the timeout, or that the server cannot answer readably): past the deadline, while the
# pool answers others, they fail the record alone. Load and connection failures never do.
OWN_KINDS = frozenset({"server_error", "timeout", "dropped", "bad_response"})
MESSAGE_CHARS = 500  # of a server's error message, in a trace
ANSWER_CHARS = 80  # of a probe's unconstrained answer, in a start-up error


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
@dataclass
class Route:
    """Where one step's requests go: its model, that model's pool, and for the judge how
    the pool's servers are held to the choices (decided in `start`)."""

    model: str
    pool: Pool
    mode: constraint.Mode = "structured_outputs"


class _Transient(Exception):
    """One try failed in a way another try may not: retried until the deadline."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class _Failing:
    """A request that has failed: since when (its first failure), how long it has queued for
    a slot since (time off its clock: a busy pool is not a failing one), its failed tries, the
    last failure and the endpoint it was on."""

    since: float
    queued: float = 0.0
    tries: int = 0
    last: _Transient | None = None
    endpoint: Endpoint | None = None

    def failed(self, exc: _Transient, endpoint: Endpoint) -> None:
        self.tries += 1
        self.last, self.endpoint = exc, endpoint

    def seconds(self, now: float) -> float:
        """How long the request itself has been failing: trying and backing off, not
        queueing."""
        return now - self.since - self.queued


@dataclass(frozen=True)
class _Answer:
    """A 200's chat completion, read and checked whole: nothing in it can fail later."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


def _server_message(response: httpx.Response) -> str:
    """The error's own words: OpenAI's `{"error": {"message"}}`, vLLM's older
    `{"message"}`, or the start of the body."""
    try:
        data = response.json()
    except (ValueError, RecursionError):
        data = None
    message: Any = None
    if isinstance(data, dict):
        error = data.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        message = message or data.get("message") or data.get("detail")
    text = str(message) if message else response.text.strip() or response.reason_phrase
    return _one_line(text, MESSAGE_CHARS)


def _one_line(text: str, limit: int) -> str:
    return " ".join(text.split())[:limit]


def _api_key(env: str | None, where: str) -> str | None:
    if env is None:
        return None
    key = os.environ.get(env)
    if not key:
        raise ConfigError(f"{where}: ${env} is not set (it should hold the API key)")
    return key


def _served_at(settings: OpenAISettings, model: str) -> tuple[str, list[str], str | None]:
    """Where `model` is served: the label of its pool, its URLs and its key's variable; its
    own entry in `openai.models`, else the shared endpoints."""
    served = settings.models.get(model)
    if served:
        return f"openai.models.{model}.endpoints", served.endpoints, served.api_key_env
    return "openai.endpoints", settings.endpoints, settings.api_key_env


class OpenAIEngine:
    """Chat completions from OpenAI-compatible servers, with per-endpoint adaptive
    concurrency and retries that never drop a record silently."""

    def __init__(self, config: Config, transport: httpx.AsyncBaseTransport | None = None) -> None:
        """`transport`, when given, carries every endpoint's requests instead of the network:
        a server simulated in the process (the AIMD benchmark) sees exactly what a real one
        would, through the same client."""
        settings = config.openai
        self._settings = settings
        self._transport = transport
        self._extra = dict(config.engine_kwargs)
        self._template_kwargs = dict(config.chat_template_kwargs)
        self._endpoints: dict[str, Endpoint] = {}
        self._dead: str | None = None
        self._closed = False
        self._closing: list[asyncio.Task[None]] = []
        self._watchers: list[asyncio.Task[None]] = []  # reading servers' queues
        logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
        models = {step: config.step_models.get(step, config.model_name) for step in STEPS}
        self._keys = self._read_keys(models.values())
        pools: dict[str, Pool] = {}
        self._routes: dict[str, Route] = {}
        for step, model in models.items():
            if model not in pools:
                pools[model] = self._pool(model, pools)
            self._routes[step] = Route(model, pools[model])
        if settings.judge_constraint != "auto":
            self._routes["judge"].mode = settings.judge_constraint

    def _read_keys(self, models: Iterable[str]) -> dict[str, str | None]:
        """Every endpoint's key, by URL, read before any client is made: a key that is not
        set, or a URL listed with two key variables, leaves no client behind."""
        keys: dict[str, str | None] = {}
        key_envs: dict[str, str | None] = {}
        for model in models:
            label, urls, key_env = _served_at(self._settings, model)
            for url in urls:
                if url in key_envs and key_envs[url] != key_env:
                    raise ConfigError(
                        f"{label}: {url} is listed elsewhere with another api_key_env"
                    )
                key_envs[url] = key_env
                keys[url] = _api_key(key_env, label.removesuffix(".endpoints") + ".api_key_env")
        return keys

    def _pool(self, model: str, pools: dict[str, Pool]) -> Pool:
        """The pool serving `model`: its own (`openai.models`), else the shared one."""
        label, urls, key_env = _served_at(self._settings, model)
        for pool in pools.values():
            if pool.label == label:
                return pool
        return Pool(label, [self._endpoint(url, key_env) for url in urls])

    def _endpoint(self, url: str, key_env: str | None) -> Endpoint:
        """One endpoint per URL, whichever pools list it: its limit is the server's."""
        known = self._endpoints.get(url)
        if known is not None:
            return known
        settings = self._settings
        key = self._keys[url]
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.request_timeout, connect=settings.connect_timeout),
            limits=httpx.Limits(  # (one more: the readings of the server's queue)
                max_connections=settings.max_in_flight + 1,
                max_keepalive_connections=settings.max_in_flight + 1,
            ),
            headers={"Authorization": f"Bearer {key}"} if key else None,
            transport=self._transport,
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
        if self._settings.server_queue:
            self._watchers = await serverqueue.start_watching(list(self._endpoints.values()))

    async def _choose_constraint(self, route: Route) -> None:
        """The first way of asking whose probe answer is one of the probe's choices. When
        none is, the line names what the server last said: a refusal's own message (a model
        without a chat template, say) is the thing to fix, not the constraint."""
        last = "no answer"
        for mode in constraint.MODES:
            try:
                answer, _ = await self._post(route.pool, constraint.probe_body(route.model, mode))
            except RequestError as exc:
                last = f"{mode}: {exc}"
                continue  # the server refused the field, or the request
            except EngineDead as exc:  # at start-up: one line and exit 2, as a bad URL is
                label, message = route.pool.label, str(exc)
                message = message if message.startswith(label) else f"{label}: {message}"
                raise EndpointError(f"{message} (probing the judge's constraint)") from None
            text = constraint.answer(mode, answer.text)
            if text in constraint.PROBE_CHOICES:
                route.mode = mode
                log.info("openai: the judge's answers are held by %s (%s)", mode, route.pool.urls)
                return
            last = f"{mode}: answered {_one_line(text, ANSWER_CHARS)!r}"
        raise EndpointError(
            f"{route.pool.label}: {route.pool.urls} does not hold model {route.model!r} to a "
            "judge's choices (tried structured_outputs, guided_choice and a json_schema "
            f"response_format); the judge cannot be constrained there; last: {last}"
        )

    # --- requests ---------------------------------------------------------------------------
    async def complete(self, request: Request) -> Completion:
        if self._closed:
            raise EngineDead("the openai engine was closed")
        if self._dead is not None:
            raise EngineDead(self._dead)
        route = self._routes[request.step]
        answer, retries = await self._post(route.pool, self._body(request, route))
        text = constraint.answer(route.mode, answer.text) if request.choices else answer.text
        return Completion(
            text=text,
            finish_reason=answer.finish_reason,
            prompt_tokens=answer.prompt_tokens,
            completion_tokens=answer.completion_tokens,
            retries=retries,
        )

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
            room = constraint.choice_room(request.max_tokens, request.choices)
            body["max_tokens"] = constraint.min_tokens(route.mode, room)
        return body

    async def _post(self, pool: Pool, body: dict[str, Any]) -> tuple[_Answer, int]:
        """The answer to `body` from `pool` and the retries it took, retrying transient
        failures until `_verdict` gives up. A `RequestError` carries the retries spent on it."""
        failing: _Failing | None = None
        while True:
            asked = clock()
            lease = await self._acquire(pool, failing)
            if failing is not None:
                failing.queued += clock() - asked
            try:
                return await self._attempt(lease, body), (failing.tries if failing else 0)
            except RequestError as exc:
                exc.retries = failing.tries if failing else 0
                raise
            except _Transient as exc:
                now = clock()
                failing = failing or _Failing(now)
                failing.failed(exc, lease.endpoint)
                lease.endpoint.errors[exc.kind] += 1
                verdict = self._verdict(pool, failing, now)
                if verdict is not None:
                    raise verdict from None
                lease.endpoint.retries += 1
                delay = self._retry_delay(failing, now)
                log.info(
                    "openai: %s failed (%s: %s); retry %d in %.1f s",
                    lease.endpoint.url,
                    exc.kind,
                    exc,
                    failing.tries,
                    delay,
                )
                await pool.backoff(delay, failing.since)

    async def _acquire(self, pool: Pool, failing: _Failing | None) -> Lease:
        """A slot in the pool; for a retry, on another endpoint than the one it failed on
        where one has room. The wait is not bounded by the deadline: a slot frees as soon as
        a request in flight ends (its answer, its failure, its timeout)."""
        if self._dead is not None:
            raise EngineDead(self._dead)
        return await pool.acquire(failing.endpoint if failing is not None else None)

    def _verdict(self, pool: Pool, failing: _Failing, now: float) -> Exception | None:
        """None to try again, else what the request ends with. It is the pool as a whole
        that decides, not one endpoint: a pool that answered no request since this one
        first failed (nor within the deadline) is gone once the deadline has passed; a pool
        that answers others fails this request alone once it has failed on its own for the
        deadline (a server error, a timeout, a dropped connection, an unreadable answer),
        and never gives up on it for load or a connection (the pool still serves)."""
        deadline = self._settings.retry_deadline
        exc = failing.last
        assert exc is not None
        answering = pool.last_success > max(failing.since, now - deadline)
        if not answering:
            if now - failing.since < deadline:
                return None
            self._dead = (
                f"{pool.label}: {pool.urls} failed every try for {deadline:g} s "
                f"(openai.retry_deadline); last: {exc.kind}: {exc}"
            )
            return EngineDead(self._dead)
        if exc.kind in OWN_KINDS and failing.seconds(now) >= deadline:
            return RequestError(
                f"the server kept failing this request for {failing.seconds(now):.1f} s "
                f"({failing.tries} tries) while it answered others; last: {exc.kind}: {exc}",
                retries=failing.tries,
            )
        return None

    def _retry_delay(self, failing: _Failing, now: float) -> float:
        """The backoff before the next try; while the deadline is ahead, the last try is
        at it."""
        delay = backoff_delay(failing.tries)
        left = self._settings.retry_deadline - failing.seconds(now)
        return min(delay, left) if left > 0 else delay

    async def _attempt(self, lease: Lease, body: dict[str, Any]) -> _Answer:
        """One try on one endpoint; the lease ends here, whatever happens (an outcome below,
        else, in `finally`, a free slot: cancelled, or an error no branch foresaw)."""
        endpoint = lease.endpoint
        endpoint.requests += 1
        try:
            response = await endpoint.client.post(f"{endpoint.url}/chat/completions", json=body)
            return self._answer(lease, response)
        except httpx.ConnectTimeout as exc:
            lease.faulted(_fault_pause(endpoint.faults))
            raise _Transient("connect", f"connection timed out ({exc})") from None
        except httpx.TimeoutException as exc:
            lease.timed_out()
            raise _Transient("timeout", f"no answer in time ({type(exc).__name__})") from None
        except httpx.ConnectError as exc:
            lease.faulted(_fault_pause(endpoint.faults))
            raise _Transient("connect", connect_reason(exc)) from None
        except httpx.TransportError as exc:
            lease.faulted(_fault_pause(endpoint.faults))
            raise _Transient("dropped", f"{type(exc).__name__}: {exc}") from None
        except httpx.HTTPError as exc:  # a body that cannot be decoded, say
            lease.faulted(_fault_pause(endpoint.faults))
            raise _Transient("bad_response", f"{type(exc).__name__}: {exc}") from None
        finally:
            lease.failed()  # a no-op after any outcome above

    def _answer(self, lease: Lease, response: httpx.Response) -> _Answer:
        status = response.status_code
        if status == 200:
            return self._completion(lease, response)
        message = f"HTTP {status}: {_server_message(response)}"
        if status == 408:
            lease.timed_out()
            raise _Transient(OVERLOAD_STATUS[status], message)
        if status in OVERLOAD_STATUS:
            lease.overloaded(retry_after(response.headers.get("retry-after")))
            raise _Transient(OVERLOAD_STATUS[status], message)
        if status >= 500:
            lease.faulted(_fault_pause(lease.endpoint.faults))
            raise _Transient("server_error", message)
        lease.failed()
        lease.endpoint.errors["rejected"] += 1
        if status in FATAL_STATUS:
            self._dead = f"{lease.endpoint.url} refused the engine: {message}"
            raise EngineDead(self._dead)
        raise RequestError(f"{lease.endpoint.url} rejected the request: {message}")

    def _completion(self, lease: Lease, response: httpx.Response) -> _Answer:
        """A 200, read whole. One that holds an error (as some gateways answer a failure
        upstream), is no chat completion, or has counts that are no whole numbers is the
        server's fault, not the request's: retried as a server error is."""
        pause = _fault_pause(lease.endpoint.faults)
        try:
            data = response.json()
        except (ValueError, RecursionError):
            data = None
        if isinstance(data, dict) and data.get("error") and not data.get("choices"):
            lease.faulted(pause)
            raise _Transient("server_error", f"HTTP 200 with an error: {_server_message(response)}")
        try:
            answer = _read_answer(data)
        except ValueError as exc:
            lease.faulted(pause)
            shown = _one_line(response.text, MESSAGE_CHARS)
            raise _Transient(
                "bad_response", f"HTTP 200 without a readable chat completion ({exc}): {shown!r}"
            ) from None
        if answer.finish_reason == "abort":  # a stopping server cut it off: never a record
            lease.faulted(pause)
            raise _Transient("dropped", "the server aborted the request")
        lease.succeeded(answer.completion_tokens)
        return answer

    # --- the rest of the contract -----------------------------------------------------------
    def stats(self) -> dict[str, EndpointStats]:
        """Each endpoint's limit, requests in flight, retries and errors, by URL."""
        return {url: endpoint.stats() for url, endpoint in self._endpoints.items()}

    def marker_info(self) -> dict[str, Any]:
        """What each chunk's marker records of this engine: how the judge's pool held its
        answers to the choices. `auto` finds it per worker, so workers with other servers
        may differ, and the fingerprint cannot hold it; the marker shows a mixed run."""
        return {"judge_constraint": self._routes["judge"].mode}

    def close(self) -> None:
        """Refuse further requests and close the clients' connections. Safe to call twice.
        Closing needs the event loop: called on it, the clients close as soon as it runs
        again; `aclose` waits for them."""
        if self._closed:
            return
        self._closed = True
        for watcher in self._watchers:
            watcher.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: the sockets close with the process
        self._closing = [loop.create_task(e.client.aclose()) for e in self._endpoints.values()]

    async def aclose(self) -> None:
        """`close`, waiting until every connection is closed."""
        await serverqueue.stop_watching(self._watchers)
        if not self._closed:
            self._closed = True
            await asyncio.gather(*(e.client.aclose() for e in self._endpoints.values()))
        else:
            await asyncio.gather(*self._closing)


def _fault_pause(faults: int) -> float:
    """How long an endpoint that failed `faults` times in a row (before this one: refused
    or dropped connections, server errors) is left alone: doubling, like a request's
    backoff, without its jitter."""
    return min(CAP_SECONDS, BASE_SECONDS * 2 ** min(faults, MAX_DOUBLINGS))


def _read_answer(data: Any) -> _Answer:
    """The completion in a 200's JSON; ValueError, naming what is wrong, if it is none."""
    choices = data.get("choices") if isinstance(data, dict) else None
    choice = choices[0] if isinstance(choices, list) and choices else None
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise ValueError("no choices[0].message")
    assert isinstance(choice, dict) and isinstance(data, dict)
    content, finish = message.get("content"), choice.get("finish_reason")
    if not isinstance(content, str | None) or not isinstance(finish, str | None):
        raise ValueError("content or finish_reason is not a string")
    usage = data.get("usage") or {}
    if not isinstance(usage, dict):
        raise ValueError("usage is not an object")
    return _Answer(
        text=content or "",
        finish_reason=finish,
        prompt_tokens=_token_count(usage, "prompt_tokens"),
        completion_tokens=_token_count(usage, "completion_tokens"),
    )


def _token_count(usage: dict[str, Any], name: str) -> int:
    """`usage[name]` as a count: 0 when a server leaves it out; ValueError for anything that
    is not a whole number of at least 0 (a string, 1e400, -1)."""
    value = usage.get(name)
    if value is None:
        return 0
    whole = type(value) is int or (type(value) is float and value.is_integer())
    if not whole or value < 0:
        raise ValueError(f"usage.{name} is not a count ({value!r})")
    return int(value)
