"""A fake OpenAI-compatible server for the engine's fast tests: stdlib HTTP on a loopback port,
in a thread of the test process, scripted per test.

`FakeOpenAI` serves `GET /v1/models` and `POST /v1/chat/completions`. Each chat request's body
is kept (`requests`), and answered by the next scripted `Reply` if there is one (`script`),
else by default: for a judge-like request, the first choice in the field the server is told
to honour (`honours`: "structured_outputs", "guided_choice", "json_schema", or None for a
server that ignores them all and answers freely); otherwise a Japanese sentence long enough
to pass the pipeline's filters. `key` makes it want `Authorization: Bearer KEY`; `fails`
answers the requests it picks with a failure of its choosing, every time (a broken server, a
prompt that crashes one), and `delay` slows every default answer.

`dead_port()` is a port nobody listens on, and `NotHttp` a server that answers every
connection with a line that is not HTTP.
"""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

LoopbackT = TypeVar("LoopbackT", bound="_Loopback")
DEFAULT_TEXT = "これはテスト用に生成された、十分な長さのある日本語の文章です。"


@dataclass
class Reply:
    """One scripted answer: a status and a body (a dict is sent as JSON), headers, a delay
    before answering, or `drop` to close the connection without one."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False


def chat_answer(text: str, finish: str = "stop", prompt_tokens: int = 7) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(text),
            "total_tokens": prompt_tokens + len(text),
        },
    }


def choices_of(body: dict[str, Any], honours: str | None) -> list[str] | None:
    """The choices a request asks for in the one field this server honours."""
    if honours == "structured_outputs":
        return (body.get("structured_outputs") or {}).get("choice")
    if honours == "guided_choice":
        return body.get("guided_choice")
    if honours == "json_schema":
        form = body.get("response_format") or {}
        return ((form.get("json_schema") or {}).get("schema") or {}).get("enum")
    return None


class _Loopback:
    """A socketserver on a loopback port, served by a thread while in a `with` block."""

    _server: socketserver.TCPServer

    def _serve(self, server: socketserver.TCPServer) -> None:
        self._server = server
        self._port = int(server.server_address[1])  # kept: the URL outlives the socket
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self: LoopbackT) -> LoopbackT:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class FakeOpenAI(_Loopback):
    def __init__(
        self,
        models: tuple[str, ...] = ("served-model",),
        honours: str | None = "structured_outputs",
        key: str | None = None,
        answer: Callable[[dict[str, Any]], str] | None = None,
        fails: Callable[[dict[str, Any]], Reply | None] | None = None,
        delay: float = 0.0,
    ) -> None:
        self.models = models
        self.honours = honours
        self.key = key
        self.answer = answer
        self.fails = fails
        self.delay = delay
        self.script: deque[Reply] = deque()
        self.requests: list[dict[str, Any]] = []
        self.model_lists = 0  # GET /models answered
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._serve(_Server(("127.0.0.1", 0), _handler(self)))

    def stop(self) -> None:
        """Stop listening and cut every open connection (kept-alive ones too): from now on
        the port refuses, as a killed server's would."""
        super().stop()
        with self._lock:
            for connection in list(self._connections):
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)

    def reply(self, body: dict[str, Any]) -> Reply:
        with self._lock:
            self.requests.append(body)
            if self.script:
                return self.script.popleft()
        failure = self.fails(body) if self.fails is not None else None
        if failure is not None:
            return failure
        choices = choices_of(body, self.honours)
        if choices:
            text = (
                json.dumps(choices[0], ensure_ascii=False)
                if self.honours == "json_schema"
                else choices[0]
            )
        elif self.answer is not None:
            text = self.answer(body)
        else:
            text = f"{DEFAULT_TEXT} 番号{body.get('seed', 0) % 1000}"
        return Reply(body=chat_answer(text), delay=self.delay)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def _handler(fake: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a real server

        def setup(self) -> None:
            super().setup()
            with fake._lock:
                fake._connections.add(self.connection)

        def finish(self) -> None:
            with fake._lock:
                fake._connections.discard(self.connection)
            super().finish()

        def log_message(self, format: str, *args: Any) -> None:
            return None

        def _authorised(self) -> bool:
            if fake.key is None or self.headers.get("Authorization") == f"Bearer {fake.key}":
                return True
            self._send(Reply(401, {"error": {"message": "Invalid API key", "code": 401}}))
            return False

        def do_GET(self) -> None:
            if not self._authorised():
                return
            if self.path != "/v1/models":
                self._send(Reply(404, {"detail": "Not Found"}))
                return
            with fake._lock:
                fake.model_lists += 1
            data = [{"id": name, "object": "model"} for name in fake.models]
            self._send(Reply(body={"object": "list", "data": data}))

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if not self._authorised():
                return
            if self.path != "/v1/chat/completions":
                self._send(Reply(404, {"detail": "Not Found"}))
                return
            if body.get("model") not in fake.models:
                message = f"The model `{body.get('model')}` does not exist."
                self._send(Reply(404, {"error": {"message": message, "code": 404}}))
                return
            self._send(fake.reply(body))

        def _send(self, reply: Reply) -> None:
            """Answer; a client that gave up waiting (its timeout) is not an error here."""
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._answer(reply)

        def _answer(self, reply: Reply) -> None:
            if reply.delay:
                time.sleep(reply.delay)
            if reply.drop:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            raw = reply.body
            data = (
                json.dumps(raw, ensure_ascii=False).encode()
                if isinstance(raw, (dict, list))
                else (raw.encode() if isinstance(raw, str) else raw or b"")
            )
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


def dead_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NotHttp(_Loopback):
    """A server that answers every connection with a line of another protocol."""

    def __init__(self) -> None:
        class Greeter(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")

        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Greeter)
        server.daemon_threads = True
        self._serve(server)
