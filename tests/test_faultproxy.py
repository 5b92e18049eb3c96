"""The fault proxy (tests/faultproxy.py) in front of a plain HTTP upstream: every fault it
scripts is seen by an httpx client as a real server's would be, and counted. No vLLM here:
tests/test_servedvllm.py puts it in front of `vllm serve`."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from .faultproxy import FaultProxy

CHAT = "/v1/chat/completions"


class Upstream(ThreadingHTTPServer):
    """Answers every request with what it received, and counts them."""

    seen: list[str]


class _Echo(BaseHTTPRequestHandler):
    server: Upstream

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        self.server.seen.append(self.path)
        out = json.dumps(
            {"method": self.command, "path": self.path, "body": body, "key": self.headers["X-Key"]}
        ).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Upstream", "echo")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream(("127.0.0.1", 0), _Echo)
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def proxy(upstream: Upstream) -> Iterator[FaultProxy]:
    with FaultProxy(f"http://127.0.0.1:{upstream.server_address[1]}") as proxy:
        yield proxy


@pytest.fixture
def client(proxy: FaultProxy) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.url, headers={"X-Key": "k"}, timeout=30) as client:
        yield client


def test_a_request_without_faults_reaches_the_upstream_whole(
    proxy: FaultProxy, client: httpx.Client
) -> None:
    response = client.post(CHAT + "?a=1", json={"text": "はい"})
    assert response.status_code == 201
    assert response.headers["X-Upstream"] == "echo"
    assert response.json() == {
        "method": "POST",
        "path": CHAT + "?a=1",
        "body": '{"text":"はい"}',
        "key": "k",
    }
    assert proxy.counts() == {"requests": 1, "passed": 1}


def test_429_carries_retry_after_for_the_next_requests_only(
    proxy: FaultProxy, client: httpx.Client, upstream: Upstream
) -> None:
    proxy.fail_429(2, retry_after=3)
    for _ in range(2):
        response = client.post(CHAT, json={})
        assert response.status_code == 429
        assert response.headers["Retry-After"] == "3"
        assert response.json()["error"]["code"] == 429
    assert client.post(CHAT, json={}).status_code == 201
    assert upstream.seen == [CHAT]
    assert proxy.counts() == {"requests": 3, "429": 2, "passed": 1}


def test_500_never_reaches_the_upstream(
    proxy: FaultProxy, client: httpx.Client, upstream: Upstream
) -> None:
    proxy.fail_500()
    response = client.post(CHAT, json={})
    assert response.status_code == 500
    assert response.json()["error"]["message"] == "fault proxy: internal error"
    assert upstream.seen == []
    assert proxy.counts()["500"] == 1


def test_a_dropped_connection_gets_no_response(
    proxy: FaultProxy, client: httpx.Client, upstream: Upstream
) -> None:
    proxy.drop()
    with pytest.raises(httpx.RemoteProtocolError):
        client.post(CHAT, json={})
    assert upstream.seen == []
    assert client.post(CHAT, json={}).status_code == 201
    assert proxy.counts() == {"requests": 2, "dropped": 1, "passed": 1}


def test_a_drop_after_the_upstream_loses_work_that_was_done(
    proxy: FaultProxy, client: httpx.Client, upstream: Upstream
) -> None:
    proxy.drop(after_upstream=True)
    with pytest.raises(httpx.RemoteProtocolError):
        client.post(CHAT, json={})
    assert upstream.seen == [CHAT]
    assert proxy.counts() == {"requests": 1, "dropped": 1}


def test_a_delayed_request_outlasts_a_short_client_timeout(
    proxy: FaultProxy, client: httpx.Client
) -> None:
    proxy.delay(600)  # far beyond the client's timeout; the proxy's stop cuts it short
    with pytest.raises(httpx.ReadTimeout):
        client.post(CHAT, json={}, timeout=1)
    proxy.delay(0.05)
    assert client.post(CHAT, json={}).status_code == 201
    assert proxy.counts()["delayed"] == 2
    assert proxy.pending() == 0


def test_latency_delays_every_request_until_cleared(
    proxy: FaultProxy, client: httpx.Client
) -> None:
    proxy.set_latency(0.01)
    for _ in range(3):
        assert client.post(CHAT, json={}).status_code == 201
    proxy.clear()
    assert client.post(CHAT, json={}).status_code == 201
    assert proxy.counts() == {"requests": 4, "delayed": 3, "passed": 4}


def test_faults_are_met_in_the_order_they_were_scripted(
    proxy: FaultProxy, client: httpx.Client
) -> None:
    proxy.fail_429()
    proxy.fail_500()
    proxy.drop()
    proxy.fail_429()
    seen = []
    for _ in range(5):
        try:
            seen.append(client.post(CHAT, json={}).status_code)
        except httpx.RemoteProtocolError:
            seen.append("dropped")
    assert seen == [429, 500, "dropped", 429, 201]
    assert [what for _, what in proxy.events()] == ["429", "500", "dropped", "429", "passed"]


def test_other_paths_pass_while_faults_wait_for_generation_requests(
    proxy: FaultProxy, client: httpx.Client
) -> None:
    proxy.fail_500()
    assert client.get("/v1/models").status_code == 201
    assert proxy.pending() == 1
    assert client.post(CHAT, json={}).status_code == 500


def test_every_path_takes_faults_when_asked(upstream: Upstream) -> None:
    with FaultProxy(f"http://127.0.0.1:{upstream.server_address[1]}", faulted_paths=None) as p:
        p.fail_500()
        assert httpx.get(p.url + "/v1/models", headers={"X-Key": "k"}).status_code == 500


def test_an_unreachable_upstream_is_a_502() -> None:
    with FaultProxy("http://127.0.0.1:9") as proxy:  # the discard port: nothing listens
        response = httpx.post(proxy.url + CHAT, json={})
    assert response.status_code == 502
    assert "upstream http://127.0.0.1:9 failed" in response.json()["error"]["message"]
    assert proxy.counts() == {"requests": 1, "502": 1}


def test_stop_cuts_a_delayed_request_and_stops_listening(proxy: FaultProxy) -> None:
    proxy.delay(600)
    errors: list[BaseException] = []

    def post() -> None:
        try:
            httpx.post(proxy.url + CHAT, json={}, headers={"X-Key": "k"}, timeout=600)
        except httpx.HTTPError as exc:
            errors.append(exc)

    waiting = threading.Thread(target=post)
    waiting.start()
    while proxy.counts().get("delayed") != 1:
        time.sleep(0.01)
    url = proxy.url
    proxy.stop()
    proxy.stop()  # twice is fine
    waiting.join(timeout=60)
    assert not waiting.is_alive()
    assert [type(e) for e in errors] == [httpx.RemoteProtocolError]
    with pytest.raises(httpx.ConnectError):
        httpx.post(url + CHAT, json={})
