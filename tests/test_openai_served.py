"""`engine: openai` through a real `vllm serve` (the session's server, tests/servedvllm.py), with
the commands run as a user runs them, as processes: `zoi generate` and `zoi run` write the
records the in-process engine writes; the judge keeps to はい/いいえ at temperature 1; faults
in front of the server and the server killed mid-run change nothing in the output and show as
retries in the chunk log; bad endpoints, keys and models stop each command at start-up in one
line.

Each test costs a few seconds of the session's server, but the restart test, which waits for
the server to come back (about 25 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from subprocess import PIPE
from typing import Any, TypeVar

import pytest
import yaml

from .clitools import assert_one_line_error
from .fakeopenai import NotHttp, dead_port
from .faultproxy import DEFAULT_FAULTED, FaultProxy
from .queue_helpers import ENV, ROOT, ZOI, password_server, run_args, zoi
from .servedvllm import API_KEY, PROMPTS, SERVED_NAME, Reference, Restart, ServedVLLM

SERVED = [
    pytest.mark.vllm,
    pytest.mark.served,
    pytest.mark.skipif(os.environ.get("ZOI_SKIP_VLLM") == "1", reason="ZOI_SKIP_VLLM=1"),
]
Test = TypeVar("Test", bound=Callable[..., None])
KEY_ENV = "ZOI_TEST_KEY"
WRONG_KEY = "zoi-wrong-key-4f2a9c"
CHUNK = 6
TIMEOUT = 600  # seconds for one command
# The restart test's run: it waits for the server's return, and must end before the
# test's own timeout (600 s) to say what it met.
RESTART_TIMEOUT = 450


def served(test: Test) -> Test:
    """Mark a test as one that needs the session's `vllm serve`."""
    for mark in SERVED:
        test = mark(test)
    return test


def served_config(directory: Path, base_url: str, name: str = "served.yml", **changes: Any) -> Path:
    """examples/tiny_cpu.yml for engine openai at `base_url`: the same data settings, the
    served model's name and the key from $ZOI_TEST_KEY. vLLM's own arguments are the
    server's flags (the fixture gives it the same ones), not fields of the requests.
    `openai` in `changes` is merged into that section, `judge` into sampling.judge (the demo's
    sampled judge, which the in-process reference uses too); any other key replaces the
    demo's."""
    data = yaml.safe_load((ROOT / "examples" / "tiny_cpu.yml").read_text(encoding="utf-8"))
    del data["engine_kwargs"], data["hardware_kwargs"]
    section = {"endpoints": [base_url], "api_key_env": KEY_ENV, **changes.pop("openai", {})}
    data["sampling"]["judge"] = {**data["sampling"].get("judge", {}), **changes.pop("judge", {})}
    data.update({"model_name": SERVED_NAME, "engine": "openai", "openai": section, **changes})
    path = directory / name
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def env(key: str = API_KEY) -> dict[str, str]:
    return {**ENV, KEY_ENV: key}


def json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def generate(config: Path, out: Path, end: int = PROMPTS, *extra: str) -> None:
    done = zoi(
        "generate", "-c", str(config), "--start", "0", "--end", str(end), "-o", str(out), *extra,
        env=env(), timeout=TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def run(config: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return zoi(*run_args(config, out, PROMPTS, CHUNK, *extra), env=env(), timeout=TIMEOUT)


def run_beside(restart: Restart, config: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """`run` while `restart` takes the server away and brings it back; if the restart fails,
    the run is killed and the restart's error raised at once: a server that never comes back
    would hold the run for its whole retry deadline, past the test's timeout, with nothing
    said."""
    command = [ZOI, *run_args(config, out, PROMPTS, CHUNK)]
    deadline = time.monotonic() + RESTART_TIMEOUT
    with subprocess.Popen(command, stdout=PIPE, stderr=PIPE, text=True, env=env()) as process:
        while True:
            try:
                stdout, stderr = process.communicate(timeout=1)
                return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
            except subprocess.TimeoutExpired:
                if restart.error is None and time.monotonic() < deadline:
                    continue
            process.kill()  # its workers stop with it
            _, stderr = process.communicate()
            if restart.error is not None:
                raise restart.error
            raise AssertionError(f"zoi run still running after {RESTART_TIMEOUT} s:\n{stderr}")


def chunk_log(out: Path) -> list[dict[str, Any]]:
    """The lines of the run's chunk log (`zoi run -o OUT` keeps the run in OUT.run)."""
    return json_lines(Path(f"{out}.run") / "logs" / "chunks.jsonl")


# --- the same records as in-process ----------------------------------------------------------


@served
def test_generate_through_the_server_writes_the_in_process_records(
    vllm_server: ServedVLLM, vllm_reference: Reference, tmp_path: Path
) -> None:
    """Byte for byte. The traces differ in one field, as docs/engines.md says: the chat API's
    log-probabilities are not read, so no judge step has a `yes_probability`."""
    out, trace = tmp_path / "out.jsonl", tmp_path / "trace.jsonl"
    generate(served_config(tmp_path, vllm_server.base_url), out, PROMPTS, "--trace", str(trace))
    assert out.read_bytes() == vllm_reference.records.read_bytes()
    served, in_process = json_lines(trace), json_lines(vllm_reference.trace)
    judged = [step for o in in_process for step in o["steps"] if "yes_probability" in step]
    assert judged and not any("yes_probability" in step for o in served for step in o["steps"])
    for step in judged:
        del step["yes_probability"]
    assert served == in_process


@served
def test_run_through_the_server_writes_them_too_and_retries_nothing(
    vllm_server: ServedVLLM, vllm_reference: Reference, tmp_path: Path
) -> None:
    """Two thin workers, four chunks: the same bytes, and a chunk log that counts no retry
    where nothing failed. Run again once finished, it only merges: no server needed."""
    out = tmp_path / "out.jsonl"
    done = run(served_config(tmp_path, vllm_server.base_url), out, "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == vllm_reference.records.read_bytes()
    logged = chunk_log(out)
    assert len(logged) == PROMPTS // CHUNK
    assert [line["retries"] for line in logged] == [0] * len(logged)
    gone = served_config(tmp_path, f"http://127.0.0.1:{dead_port()}/v1", "gone.yml")
    again = run(gone, out)
    assert again.returncode == 0, again.stderr
    assert out.read_bytes() == vllm_reference.records.read_bytes()


@served
def test_judge_verdicts_at_temperature_1_are_only_the_two_choices(
    vllm_server: ServedVLLM, tmp_path: Path
) -> None:
    """The server holds a sampled verdict to the choices (a control without the constraint,
    which answers noise, is in test_servedvllm.py). Both verdicts come up: the temperature
    reached the server."""
    out, trace = tmp_path / "out.jsonl", tmp_path / "trace.jsonl"
    # A sampled path may spell いいえ byte by byte in the tiny model's vocabulary (9 tokens):
    # the judge's default max_tokens of 8 cut one such verdict to 「いい」 (finish_reason
    # length). The constraint is what this test is about, so the budget fits every path.
    judge = {"temperature": 1.0, "max_tokens": 16}
    config = served_config(tmp_path, vllm_server.base_url, judge=judge)
    generate(config, out, 12, "--trace", str(trace))
    outcomes = json_lines(trace)
    verdicts = [s["text"] for o in outcomes for s in o["steps"] if s["step"] == "judge"]
    assert len(verdicts) >= len(outcomes)
    assert set(verdicts) == {"はい", "いいえ"}
    assert not [o for o in outcomes if o["drop_reason"] == "judge_invalid"]


# --- faults --------------------------------------------------------------------------------

FAILURES = ("429", "500", "dropped", "502")  # what the proxy counts for a request that failed


def completions(proxy: FaultProxy) -> Counter[str]:
    """What the proxy did with chat completions, by outcome."""
    return Counter(what for path, what in proxy.events() if path.startswith(DEFAULT_FAULTED))


@served
def test_faults_and_a_server_killed_mid_run_change_nothing_and_count_as_retries(
    vllm_server: ServedVLLM,
    fault_proxy: FaultProxy,
    vllm_reference: Reference,
    tmp_path: Path,
) -> None:
    """Rate limits with Retry-After, server errors, slow answers, connections dropped before
    and after the server did the work, then the server SIGKILLed once those are met and
    started again: the merged output is the clean one's, and the chunk log's retries are
    exactly the failures the proxy handed out (a slow answer is no failure). The judge's
    constraint is set, so that no start-up probe meets a fault."""
    fault_proxy.fail_429(2, retry_after=1)
    fault_proxy.fail_500(2)
    fault_proxy.delay(1.5, 2)
    fault_proxy.drop(2)
    fault_proxy.drop(2, after_upstream=True)
    config = served_config(
        tmp_path, fault_proxy.url + "/v1", openai={"judge_constraint": "structured_outputs"}
    )
    out = tmp_path / "out.jsonl"
    restart = Restart(
        vllm_server, lambda: fault_proxy.pending() == 0 and completions(fault_proxy)["passed"] >= 30
    )
    done = run_beside(restart, config, out)
    restart.join()
    assert done.returncode == 0, done.stderr
    assert restart.killed.is_set() and vllm_server.running
    assert out.read_bytes() == vllm_reference.records.read_bytes()
    counts = fault_proxy.counts()
    assert (counts["429"], counts["500"], counts["delayed"]) == (2, 2, 2)
    assert counts["dropped"] >= 4 and counts.get("502", 0) >= 1  # the kill: more of both
    retries = sum(line["retries"] for line in chunk_log(out))
    failed = completions(fault_proxy)  # not the readings of the server's queue at /metrics
    assert retries == sum(failed[kind] for kind in FAILURES), (failed, counts)


# --- bad input -----------------------------------------------------------------------------


@contextmanager
def endpoint(problem: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A base URL with `problem`: nothing listening, something that is not HTTP (a plain
    socket that greets in another protocol, or a Redis server), or the session's server
    (for a wrong key or a model it does not serve)."""
    if problem == "unreachable":
        yield f"http://127.0.0.1:{dead_port()}/v1"
    elif problem == "not_http":
        with NotHttp() as server:
            yield server.url
    elif problem == "redis":
        with password_server(tmp_path, "secret") as port:
            yield f"http://127.0.0.1:{port}/v1"
    else:
        yield request.getfixturevalue("vllm_server").base_url


PROBLEMS = {
    "unreachable": "unreachable (Connection refused)",
    "not_http": "is not an OpenAI-compatible server (it does not answer HTTP)",
    "redis": "is not an OpenAI-compatible server (it does not answer HTTP)",
    "key": f"rejected the API key from ${KEY_ENV}",
    "model": "does not serve model 'nope' (it serves: tiny)",
}
CASES = [
    pytest.param(problem, command, marks=SERVED if problem in ("key", "model") else ())
    for problem in PROBLEMS
    for command in ("generate", "run", "worker")
]


@pytest.mark.parametrize(("problem", "command"), CASES)
def test_a_bad_endpoint_key_or_model_stops_the_command_at_start_up_in_one_line(
    problem: str, command: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Exit 2 with one line naming the setting, before any chunk is taken: `zoi run` checks
    the servers before its workers start, a worker before it takes a chunk. The key is in no
    output and no file of the run."""
    key = WRONG_KEY if problem == "key" else API_KEY
    out, run_dir = tmp_path / "out.jsonl", tmp_path / "run"
    with endpoint(problem, tmp_path, request) as url:
        model = {"model_name": "nope"} if problem == "model" else {}
        config = served_config(tmp_path, url, **model)
        if command == "generate":
            args = ["generate", "-c", str(config), "--start", "0", "--end", "4", "-o", str(out)]
        elif command == "run":
            args = [*run_args(config, out, 4, 2), "--run", str(run_dir)]
        else:
            enqueued = zoi("enqueue", "-c", str(config), "--run", str(run_dir), "--num-prompts",
                           "4", "--chunk-size", "2", env=env(key))  # fmt: skip
            assert enqueued.returncode == 0, enqueued.stderr
            args = ["worker", "--run", str(run_dir), "--burst"]
        done = zoi(*args, env=env(key), timeout=120)
    line = assert_one_line_error(done, f"openai.endpoints: {url} {PROBLEMS[problem]}")
    assert key not in done.stdout + done.stderr and not out.exists()
    if command == "generate":
        return
    assert not list((run_dir / "shards").iterdir())
    for path in run_dir.rglob("*"):
        assert not path.is_file() or key.encode() not in path.read_bytes(), path
    if command == "worker":
        state = zoi("status", "--run", str(run_dir), "--json", env=env(key))
        assert json.loads(state.stdout)["chunks"]["queued"] == 2, (line, state.stderr)
