"""Thin workers and a fleet's figures: `zoi run --workers N` for an engine that holds no GPU,
each endpoint's concurrency, requests, retries and errors in `zoi status` and the launcher's
line, and the options that do not fit an engine's kind of worker."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from zero_one_instruction import generator, machine, render
from zero_one_instruction.engines import holds_gpu
from zero_one_instruction.engines.endpointstats import (
    EndpointFigures,
    fleet,
    headline,
    parse,
    public_url,
    snapshot,
)
from zero_one_instruction.errors import ConfigError
from zero_one_instruction.liveprogress import (
    EndpointGauge,
    LiveBoard,
    endpoints_index_key,
    endpoints_key,
    read_endpoints,
)
from zero_one_instruction.progress import Progress
from zero_one_instruction.rundir import create_or_open, open_run
from zero_one_instruction.status import status
from zero_one_instruction.workerplan import PlanError, plan_thin

from . import queue_helpers
from .clitools import assert_one_line_error, zoi
from .queue_helpers import (
    ENV,
    ROOT,
    Broker,
    enqueue_run,
    run_args,
    thin_config,
    wait_until,
    worker,
)
from .scripted_engine import THIN_ENGINE, THIN_LIMIT, scripted_config

N, CHUNK = 24, 6
PUBLIC = ("http://127.0.0.1:8001/v1", "http://127.0.0.1:8002/v1")  # THIN_ENDPOINTS, shown


@pytest.fixture
def reference(tmp_path: Path) -> Path:
    """What `zoi generate` writes for [0, N) with the thin engine."""
    out = tmp_path / "reference.jsonl"
    generator.generate(thin_config(tmp_path), 0, N, out)
    return out


# --- the plan ----------------------------------------------------------------------------


def test_thin_workers_get_unique_names_no_gpu_and_no_tensor_parallel_size() -> None:
    specs = plan_thin(3)
    assert [s.name for s in specs] == ["thin0", "thin1", "thin2"]
    given = {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1", "CUDA_DEVICE_ORDER": "FASTEST_FIRST"}
    for spec in specs:
        env = spec.environment(given, "redis://h")
        assert env["CUDA_VISIBLE_DEVICES"] == ""  # no GPU at all, not the launcher's
        assert "CUDA_DEVICE_ORDER" not in env and env["PATH"] == "/bin"
        command = spec.command(Path("run"), 10.0)
        assert "--tp" not in command and command[command.index("--name") + 1] == spec.name
    with pytest.raises(PlanError, match="--workers 0"):
        plan_thin(0)


def test_whether_an_engine_holds_a_gpu() -> None:
    vllm = scripted_config().model_copy(update={"engine": "vllm"})
    served = scripted_config().model_copy(update={"engine": "openai"})
    assert holds_gpu(vllm) and not holds_gpu(served)
    assert holds_gpu(scripted_config())  # a plug-in that does not say: planned as vLLM is
    assert not holds_gpu(scripted_config(engine=THIN_ENGINE))
    with pytest.raises(ConfigError, match="cannot import module"):
        holds_gpu(scripted_config(engine="no_such_module:Engine"))


# --- the figures -------------------------------------------------------------------------


@dataclass
class _Stats:
    """Figures as an engine may keep them: a dataclass, with fields the figures do not use."""

    url: str
    limit: int
    in_flight: int
    requests: int
    retries: int
    errors: dict[str, int] = field(default_factory=dict)


def test_figures_are_read_from_dicts_or_dataclasses_and_checked() -> None:
    good = {"limit": 12.5, "in_flight": 3, "requests": 200, "retries": 4, "errors": {"429": 4}}
    assert parse("http://a/v1", good) == EndpointFigures("http://a/v1", 12.5, 3, 200, 4, {"429": 4})
    assert parse("http://a/v1", _Stats("http://a/v1", 4, 1, 10, 0)) == EndpointFigures(
        "http://a/v1", 4.0, 1, 10, 0
    )
    assert parse("http://a/v1", {**good, "up": False}).up is False  # type: ignore[union-attr]
    for bad in (
        {**good, "limit": -1},
        {**good, "limit": float("nan")},
        {**good, "requests": 1.5},
        {**good, "retries": True},
        {**good, "errors": {"429": -1}},
        {**good, "errors": [1]},
        {key: value for key, value in good.items() if key != "in_flight"},
        "figures",
    ):
        assert parse("http://a/v1", bad) is None, bad
    assert parse(7, good) is None
    assert snapshot("not a mapping") == {}


def test_urls_lose_credentials_and_queries_before_they_are_shown() -> None:
    assert public_url("https://user:pw@host:8443/v1?api-key=k#x") == "https://host:8443/v1"
    assert public_url("http://[::1]:8000/v1") == "http://[::1]:8000/v1"
    assert public_url("http://host:notaport/v1") == "<unparsable url>"
    figures = {"limit": 1, "in_flight": 0, "requests": 0, "retries": 0}
    published = snapshot({"http://u:secret@h:1/v1?key=k": figures, "http://h:2/v1": "junk"})
    assert list(published) == ["http://h:1/v1"] and "secret" not in json.dumps(published)


def test_workers_figures_add_up_per_endpoint() -> None:
    a = EndpointFigures("http://a", 8, 2, 100, 3, {"429": 2, "timeout": 1})
    b = EndpointFigures("http://a", 6.5, 1, 300, 1, {"429": 1}, up=False)
    c = EndpointFigures("http://b", 4, 0, 0, 0, {}, up=False)
    total = fleet([{"http://a": a, "http://b": c}, {"http://a": b}])
    assert [e.url for e in total] == ["http://a", "http://b"]
    assert total[0] == EndpointFigures(
        "http://a", 14.5, 3, 400, 4, {"429": 3, "timeout": 1}, True, 2
    )
    assert total[0].error_rate == pytest.approx(4 / 400) and total[1].error_rate == 0.0
    assert total[0].as_dict()["error_count"] == 4
    assert headline(total) == "endpoints: 1 up, 1 down, conc 18, err 1.0%"
    assert headline([c]) == "endpoints: 0 up, 1 down, conc 4, err 0.0%"


def test_what_steers_each_limit_is_read_added_up_and_shown(board: LiveBoard) -> None:
    """`steered_by`, where an engine says it: the server's queue or the latency; workers of
    one endpoint that differ add up to `mixed`; anything else is left out, as is a figure an
    engine does not give."""
    figures = {"limit": 8, "in_flight": 2, "requests": 10, "retries": 0, "errors": {}}
    assert parse("http://a", {**figures, "steered_by": "queue"}).steered_by == "queue"
    assert parse("http://a", {**figures, "steered_by": "guess"}).steered_by is None
    assert parse("http://a", figures).steered_by is None
    by = {name: {**figures, "steered_by": name} for name in ("queue", "latency")}
    gauges = [
        EndpointGauge(board, "w1", lambda: {"http://a/v1": by["queue"], "http://b/v1": figures}),
        EndpointGauge(
            board, "w2", lambda: {"http://a/v1": by["queue"], "http://c/v1": by["queue"]}
        ),
        EndpointGauge(board, "w3", lambda: {"http://c/v1": by["latency"]}),
    ]
    for gauge in gauges:
        gauge.publish()
    state = status(board.run, board.connection)
    assert [e.steered_by for e in state.endpoints] == ["queue", None, "mixed"]
    assert state.as_dict()["endpoints"][0]["steered_by"] == "queue"
    text = render.status(state)
    assert "  http://a/v1  conc 16 (4 in flight, 2 workers, by its queue)  requests 20" in text
    assert "  http://b/v1  conc 8 (2 in flight, 1 worker)  requests 10" in text
    assert "  http://c/v1  conc 16 (4 in flight, 2 workers, by queue and latency)" in text
    for gauge in gauges:
        gauge.stop()


def test_the_launcher_line_adds_the_endpoints_only_when_there_are_some(tmp_path: Path) -> None:
    run = create_or_open(tmp_path / "run", scripted_config(), 0, 4, 2)
    grid = {chunk.id: chunk for chunk in run.chunks()}
    progress = Progress(len(grid), 4)
    progress.update(run, grid)
    assert "endpoints" not in progress.line()
    figures = [EndpointFigures("http://a", 16, 5, 1000, 3, {"429": 3})]
    progress.update(run, grid, {}, figures)
    assert progress.line().endswith("ETA ? | endpoints: 1 up, conc 16, err 0.3%")


# --- publishing and status ---------------------------------------------------------------


@pytest.fixture
def board(tmp_path: Path) -> Iterator[LiveBoard]:
    run = create_or_open(tmp_path / "run", scripted_config(), 0, 4, 2)
    broker = Broker(run.path)
    yield LiveBoard(broker.client, run, ttl=30)
    broker.close()


def test_each_worker_publishes_its_figures_and_removes_them_when_it_leaves(
    board: LiveBoard,
) -> None:
    run, connection = board.run, board.connection
    assert "endpoints" not in status(run, connection).as_dict()  # a run on GPUs reads as before
    mine = {"limit": 8, "in_flight": 2, "requests": 90, "retries": 9, "errors": {"5xx": 9}}
    theirs = {"limit": 4, "in_flight": 1, "requests": 10, "retries": 0, "errors": {}}
    gauges = [
        EndpointGauge(board, "w1", lambda: {"http://a/v1": mine, "http://b/v1": theirs}),
        EndpointGauge(board, "w2", lambda: {"http://a/v1": theirs}),
    ]
    for gauge in gauges:
        gauge.publish()
    connection.set(endpoints_key(run, "forged"), json.dumps({"endpoints": {"http://a/v1": 5}}))
    connection.set(endpoints_key(run, "junk"), "not json")
    connection.sadd(endpoints_index_key(run), "forged", "junk", "gone")
    assert sorted(read_endpoints(connection, run)) == ["w1", "w2"]

    state = status(run, connection)
    a, b = state.endpoints
    assert (a.url, a.limit, a.in_flight, a.requests, a.retries, a.workers) == (
        "http://a/v1",
        12.0,
        3,
        100,
        9,
        2,
    )
    assert a.errors == {"5xx": 9} and b.workers == 1
    assert state.as_dict()["endpoints"][0]["error_rate"] == pytest.approx(0.09)
    text = render.status(state)
    assert "endpoints 2 up, conc 16, err 8.2%" in text  # 9 of 110
    assert (
        "  http://a/v1  conc 12 (3 in flight, 2 workers)  requests 100  retries 9  "
        "errors 9.0% (5xx 9)" in text
    )
    assert (
        "\n  http://b/v1  conc 4 (1 in flight, 1 worker)  requests 10  retries 0  errors 0.0%\n"
        in text
    )

    gauges[0].stop()
    assert [e.workers for e in status(run, connection).endpoints] == [1]
    gauges[1].stop()
    assert status(run, connection).endpoints == []
    assert connection.smembers(endpoints_index_key(run)) <= {b"forged", b"junk", b"gone"}


def test_a_failing_engine_or_redis_is_logged_once_and_never_raised(
    board: LiveBoard, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> dict[str, dict[str, Any]]:
        raise TimeoutError("the engine's loop is busy")

    no_retries = Retry(NoBackoff(), 0)
    gone = redis.Redis(unix_socket_path=str(tmp_path / "no-server.sock"), retry=no_retries)
    unreachable = LiveBoard(gone, board.run, ttl=30)
    with caplog.at_level(logging.WARNING, logger="zero_one_instruction.liveprogress"):
        for gauge in (EndpointGauge(board, "w", broken), EndpointGauge(unreachable, "w", dict)):
            gauge.publish()
            gauge.publish()
            gauge.stop()
        assert read_endpoints(gone, board.run) == {}
    said = [r.getMessage() for r in caplog.records]
    assert len([m for m in said if "loop is busy" in m]) == 1, said
    assert len([m for m in said if "not published" in m]) == 2, said  # one per spell
    assert any("unreadable" in m for m in said)


def test_status_shows_a_live_workers_endpoints_until_it_leaves(tmp_path: Path) -> None:
    """A real `zoi worker` with the thin engine: its figures are in `zoi status` while its
    requests wait on the gate, and gone once it has left."""
    gate = tmp_path / "gate"
    gate.touch()
    run_dir = tmp_path / "run"
    enqueue_run(thin_config(tmp_path, gate=gate), run_dir, N, CHUNK)
    run = open_run(run_dir)
    broker = Broker(run.path)
    proc = worker(run_dir, "--burst")
    try:
        wait_until(lambda: len(status(run, broker.client).endpoints) == 2, what="figures")
        text = zoi("status", "--run", str(run_dir)).stdout
        assert "endpoints 2 up, conc 16, err 0.0%" in text, text
        assert f"  {PUBLIC[0]}  conc {THIN_LIMIT} (0 in flight, 1 worker)" in text
        assert "secret" not in text and "key=" not in text
        gate.unlink()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert status(run, broker.client).endpoints == []  # removed on exit, not expired
        chunks = (run_dir / "logs" / "chunks.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(chunks) == N // CHUNK
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        broker.close()


# --- zoi run -------------------------------------------------------------------------------


def _open_when(gate: Path, env_log: Path, engines: int, timeout: float = 120.0) -> None:
    """Remove `gate` once `engines` engines have written their line to `env_log` (or after
    `timeout`, so that a regression fails the test's assertions instead of hanging it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if env_log.exists() and len(env_log.read_text(encoding="utf-8").splitlines()) >= engines:
            break
        time.sleep(0.05)
    gate.unlink(missing_ok=True)


def test_run_with_two_thin_workers_writes_what_one_process_writes(
    reference: Path, tmp_path: Path
) -> None:
    env_log, gate = tmp_path / "env.log", tmp_path / "gate"
    gate.touch()  # requests wait until both workers are up: a loaded machine may otherwise
    # finish the run before the second worker has built its engine
    config = thin_config(tmp_path, env_log=env_log, gate=gate)
    out = tmp_path / "out.jsonl"
    env = {**ENV, "CUDA_VISIBLE_DEVICES": "0,1"}
    opener = threading.Thread(target=_open_when, args=(gate, env_log, 2), daemon=True)
    opener.start()
    done = queue_helpers.zoi(*run_args(config, out, N, CHUNK, "--workers", "2"), env=env)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == reference.read_bytes()
    assert f"2 workers (engine {THIN_ENGINE}, no GPU)" in done.stderr
    assert "GPU found" not in done.stderr
    seen = [json.loads(line) for line in env_log.read_text(encoding="utf-8").splitlines()]
    assert len({e["pid"] for e in seen}) == 2
    assert {(e["cuda"], e["order"]) for e in seen} == {("", None)}
    logs = sorted(p.name.split("-")[1] for p in (Path(f"{out}.run") / "logs").glob("worker-*"))
    assert logs == ["thin0", "thin1"]


def test_run_shows_the_endpoints_on_its_line(
    reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every request waits until the launcher's line has shown the worker's endpoints: the
    run cannot end before it."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    gate = tmp_path / "gate"
    gate.touch()
    out = tmp_path / "out.jsonl"
    events: list[str] = []
    lines: list[str] = []

    def look(progress: Progress) -> None:
        lines.append(progress.line())
        if progress.endpoints:
            gate.unlink(missing_ok=True)

    valve = threading.Timer(120, gate.unlink, kwargs={"missing_ok": True})  # fail, never hang
    valve.start()
    try:
        report = machine.run(
            thin_config(tmp_path, gate=gate),
            out,
            0,
            N,
            chunk_size=CHUNK,
            on_event=events.append,
            on_progress=look,
        )
    finally:
        valve.cancel()
    assert out.read_bytes() == reference.read_bytes()
    assert [(w.name, w.thin) for w in report.workers] == [("thin0", True)]
    assert (
        events[0]
        == f"run {report.run}: {N // CHUNK} chunks, 1 worker (engine {THIN_ENGINE}, no GPU)"
    )
    shown = [line for line in lines if "endpoints" in line]
    assert shown and shown[0].endswith(f"| endpoints: 2 up, conc {2 * THIN_LIMIT}, err 0.0%")


# --- options that do not fit ---------------------------------------------------------------


def _run(config: Path, tmp_path: Path, *extra: str) -> Any:
    return zoi("run", "-c", str(config), "--num-prompts", "4", "-o", str(tmp_path / "o"), *extra)


def test_options_that_do_not_fit_the_engine_are_one_line(tmp_path: Path) -> None:
    thin = thin_config(tmp_path)
    vllm = tmp_path / "vllm.yml"
    vllm.write_text("model_name: some/model\n", encoding="utf-8")
    assert_one_line_error(_run(thin, tmp_path, "--workers", "0"), "--workers", "0")
    assert_one_line_error(
        _run(vllm, tmp_path, "--workers", "2"),
        "--workers: engine vllm runs one worker per GPU group",
    )
    for option in (["--tp", "2"], ["--gpus", "0"], ["--num-gpus", "1"]):
        assert_one_line_error(
            _run(thin, tmp_path, *option, "--workers", "2"),
            f"{option[0]}: engine {THIN_ENGINE} holds no GPU",
        )
    assert not (tmp_path / "o.run").exists()  # refused before the run was made


def test_a_thin_worker_refuses_gpu_options_before_it_connects(tmp_path: Path) -> None:
    """`zoi worker --gpus/--tp` for an engine that holds no GPU: one line, exit 2, and no Redis
    is looked for (the URL given is not a server)."""
    from zero_one_instruction.config import load_config

    run = create_or_open(tmp_path / "run", load_config(thin_config(tmp_path)), 0, 4, 2)
    for option in (["--tp", "2"], ["--gpus", "0"]):
        url = ["--redis-url", "redis://127.0.0.1:1"]
        result = zoi("worker", "--run", str(run.path), *url, *option)
        assert_one_line_error(result, f"{option[0]}: engine {THIN_ENGINE} holds no GPU")
