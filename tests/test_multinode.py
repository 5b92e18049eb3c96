"""Several nodes, stood in for by separate worker processes that share only the run directory
(a shared file system) and a password-protected Redis reached by URL."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .queue_helpers import ENV, FAST, ZOI, ok, password_server, scripted_config


def test_workers_on_several_nodes_share_a_redis_url(tmp_path: Path) -> None:
    config = scripted_config(tmp_path, delay=0.05)
    reference = tmp_path / "reference.jsonl"
    ok("generate", "-c", str(config), "--start", "0", "--end", "60", "-o", str(reference))
    run = tmp_path / "shared" / "run"
    with password_server(tmp_path, "node-secret") as port:
        url = f"redis://:node-secret@127.0.0.1:{port}/0"
        node_env = {**ENV, "ZOI_REDIS_URL": url}
        ok(
            "enqueue",
            "-c",
            str(config),
            "--run",
            str(run),
            "--num-prompts",
            "60",
            "--chunk-size",
            "5",
            "--redis-url",
            url,
        )
        nodes = []
        for node in ("node-a", "node-b", "node-c"):
            home = tmp_path / node
            home.mkdir()
            nodes.append(
                subprocess.Popen(
                    [ZOI, "worker", "--run", str(run), "--burst", "--name", node, *FAST],
                    cwd=home,
                    env=node_env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        for proc in nodes:
            _, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err
        state = json.loads(ok("status", "--run", str(run), "--json", "--redis-url", url))
        assert state["chunks"]["done"] == 12
    assert not (run / "redis").exists(), "with a URL, no embedded server may be started"
    merged = tmp_path / "merged.jsonl"
    ok("merge", "--run", str(run), "-o", str(merged))
    assert merged.read_bytes() == reference.read_bytes()
    workers = {
        json.loads(p.read_text())["worker"].split("-")[1] for p in (run / "shards").glob("*.done")
    }
    assert len(workers) >= 2, "the chunks should have been shared between nodes"
