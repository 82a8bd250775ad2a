"""``--model``: whatever the user named, turned into a spillover-int4 directory both processes can read.

* a spillover-int4 directory (it has ``spillover.json``): used as it is;
* a Hugging Face checkpoint directory (``config.json`` and safetensors): quantized once into the cache, as
  ``<cache>/<name>-<key>``, where the key hashes the source's path, file names, sizes and modification
  times, so an edited checkpoint is quantized again and an unchanged one never is;
* a Qwen2 GGUF file (``*.gguf``, llama.cpp's format): imported once into the cache the same way (weights,
  config, tokenizer and chat template from the file; ``quantizer.gguf_import``), keyed by its path, size and
  modification time;
* a Hugging Face repo id (``Org/Name``): downloaded with huggingface_hub (into its own cache), then the same;
* nothing: the built-in demo, a small model with **random weights** synthesized into the cache
  (``quantizer.synth.synthesize(preset="demo")``); its output is gibberish by construction.

Filling a cache entry is serialized by a lock file, so two runs started together quantize once. The
quantizer writes into a temporary directory and renames at the end, so a cache entry that exists is whole.
Every problem a person can fix raises ``ModelResolveError`` with one line naming the path or id.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import click

from quantizer.format import MANIFEST_NAME, FormatError, read_manifest
from quantizer.quantize import REPO_ID

DEMO_PRESET = "demo"
DEMO_SEED = 0
# Bump when the demo preset changes, so old cached demos are not reused.
DEMO_VERSION = 1


class ModelResolveError(Exception):
    """``--model`` names something that is not a usable model; the message says what and what to do."""


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a spillover-int4 directory
    label: str  # how to name the model to a person
    is_demo: bool  # the built-in random-weight demo


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/spillover``, else ``~/.cache/spillover``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "spillover"


def resolve_model(spec: str | None, *, cache_dir: Path, device: str) -> ResolvedModel:
    """The spillover-int4 directory for ``--model spec``, quantizing or synthesizing it into ``cache_dir`` once.

    ``device`` ("cuda" or "cpu") is where quantization or synthesis runs.
    """
    if spec is None:
        return _demo(cache_dir, device)
    path = Path(spec).expanduser()
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        try:
            read_manifest(path)
        except FormatError as e:
            raise ModelResolveError(f"--model {spec}: not a valid spillover-int4 model: {e}") from None
        return ResolvedModel(path=path.resolve(), label=str(path), is_demo=False)
    if path.is_file():
        from quantizer.gguf_import import is_gguf_file

        if not is_gguf_file(path):
            raise ModelResolveError(
                f"--model {spec} is a file but not a GGUF file: name a model directory, a .gguf file or a Hugging "
                "Face repo id"
            )
        return _quantized(path, name=path.stem, label=spec, cache_dir=cache_dir, device=device)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelResolveError(
                f"--model {spec}: neither a spillover-int4 model (no {MANIFEST_NAME}) nor a Hugging Face "
                "checkpoint (no config.json)"
            )
        return _quantized(path, name=path.resolve().name, label=spec, cache_dir=cache_dir, device=device)
    if not REPO_ID.fullmatch(spec):
        raise ModelResolveError(f"--model {spec}: no such directory, and not a Hugging Face repo id (Org/Name)")
    return _quantized(_download(spec), name=spec.replace("/", "--"), label=spec, cache_dir=cache_dir, device=device)


def _download(repo_id: str) -> Path:
    from quantizer.quantize import QuantizeError, resolve_source

    try:
        local, _ = resolve_source(repo_id)
    except QuantizeError as e:
        raise ModelResolveError(f"--model {repo_id}: no such directory, and {e}") from None
    return local


def _quantized(source: Path, *, name: str, label: str, cache_dir: Path, device: str) -> ResolvedModel:
    """The cached quantization of ``source`` (an HF checkpoint directory or a GGUF file), made now if missing."""
    from quantizer.quantize import QuantizeError, quantize_checkpoint

    dst = cache_dir / f"{name}-{_source_key(source)}"
    with _cache_lock(dst):
        if not (dst / MANIFEST_NAME).is_file():
            click.echo(f"spillover: quantizing {source} to INT4 into {dst} (once: later runs reuse it)", err=True)
            try:
                # overwrite: under the lock, a directory without a manifest is a leftover, not a model
                quantize_checkpoint(source, dst, device=device, overwrite=True)
            except QuantizeError as e:
                raise ModelResolveError(f"--model {label}: {e}") from None
    return ResolvedModel(path=dst, label=label, is_demo=False)


def _demo(cache_dir: Path, device: str) -> ResolvedModel:
    from quantizer.synth import synthesize
    from quantizer.writer import ModelWriteError

    dst = cache_dir / f"demo-v{DEMO_VERSION}"
    with _cache_lock(dst):
        if not (dst / MANIFEST_NAME).is_file():
            click.echo(f"spillover: making the built-in demo model (random weights) in {dst}", err=True)
            try:
                synthesize(dst, preset=DEMO_PRESET, device=device, seed=DEMO_SEED, overwrite=True)
            except ModelWriteError as e:
                raise ModelResolveError(f"cannot write the demo model: {e}; choose another --cache-dir") from None
    return ResolvedModel(path=dst, label="built-in demo (random weights: the text is gibberish)", is_demo=True)


def _source_key(source: Path) -> str:
    """12 hex digits that change when any file of the checkpoint (or the one GGUF file) is added, removed, resized
    or rewritten."""
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    listing = [
        (p.name if p == source else str(p.relative_to(source)), st.st_size, st.st_mtime_ns)
        for p in files
        for st in (p.stat(),)
    ]
    text = json.dumps({"source": str(source.resolve()), "files": listing})
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@contextlib.contextmanager
def _cache_lock(entry: Path) -> Iterator[None]:
    """An exclusive lock on ``<entry>.lock`` beside a cache entry, held while the entry is checked and filled."""
    lock_path = entry.with_name(entry.name + ".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = open(lock_path, "w")
    except OSError as e:
        raise ModelResolveError(
            f"cannot write the model cache {lock_path.parent}: {e.strerror}; choose another with --cache-dir"
        ) from None
    with lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield
