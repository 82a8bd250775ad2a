"""The ``spillover quantize``, ``spillover verify`` and ``spillover synth`` commands.

Thin: options in, one library call, one line out. Every failure a person can fix ends as one ``Error: …`` line
on stderr and exit status 1, never a traceback (``click.ClickException``).
"""

from __future__ import annotations

from pathlib import Path

import click

from quantizer.devices import DEVICE_CHOICES
from quantizer.format import FormatError

DEVICES = click.Choice(DEVICE_CHOICES)
SHARD_MB = click.IntRange(min=1)
MB = 10**6


@click.command()
@click.argument("src")
@click.argument("dst", type=click.Path(path_type=Path))
@click.option(
    "--device", type=DEVICES, default="auto", show_default=True, help="Where to quantize (auto: GPU when present)."
)
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@click.option("--shard-mb", type=SHARD_MB, default=2000, show_default=True, help="Largest output shard, in MB.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def quantize(src: str, dst: Path, device: str, overwrite: bool, shard_mb: int, no_progress: bool) -> None:
    """Quantize SRC (a Hugging Face checkpoint directory, a repo id, or a Qwen2 .gguf file) into the spillover-int4
    directory DST."""
    from quantizer.quantize import QuantizeError, quantize_checkpoint

    try:
        path = quantize_checkpoint(
            src, dst, device=device, overwrite=overwrite, shard_bytes=shard_mb * MB, progress=not no_progress
        )
    except (QuantizeError, FormatError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {path}")


@click.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--no-checksums", is_flag=True, help="Check presence, sizes and tensors only, not sha256.")
def verify(directory: Path, no_checksums: bool) -> None:
    """Check the spillover-int4 directory DIRECTORY against its manifest: files, sizes, sha256, tensors."""
    from quantizer.checkpoint import QuantizedCheckpoint

    try:
        checkpoint = QuantizedCheckpoint(directory)
        checkpoint.verify(checksums=not no_checksums)
    except FormatError as e:
        raise click.ClickException(str(e)) from None
    manifest = checkpoint.manifest
    total = sum(s.nbytes for s in manifest.shards)
    checked = "sizes" if no_checksums else "sizes and sha256"
    click.echo(
        f"{directory}: OK ({len(manifest.shards)} shards, {total / 1e6:.1f} MB, {len(manifest.units)} units, "
        f"{len(manifest.tensors)} tensors; {checked} checked)"
    )


@click.command()
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--preset", type=click.Choice(["qwen2-32b", "demo", "tiny"]), required=True, help="Model shapes.")
@click.option(
    "--layers", type=click.IntRange(min=1), default=None, help="Number of decoder layers (default: the preset's)."
)
@click.option("--device", type=DEVICES, default="auto", show_default=True, help="Where random bytes are drawn.")
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Random seed (same seed, same device kind: same bytes)."
)
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@click.option("--shard-mb", type=SHARD_MB, default=2000, show_default=True, help="Largest output shard, in MB.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def synth(
    dst: Path,
    preset: str,
    layers: int | None,
    device: str,
    seed: int,
    overwrite: bool,
    shard_mb: int,
    no_progress: bool,
) -> None:
    """Write a spillover-int4 model with random weights and the shapes of PRESET into DST (for benchmarks, demos)."""
    from quantizer.synth import synthesize
    from quantizer.writer import ModelWriteError

    try:
        path = synthesize(
            dst, preset=preset, layers=layers, device=device, overwrite=overwrite, seed=seed,
            shard_bytes=shard_mb * MB, progress=not no_progress,
        )
    except (ValueError, ModelWriteError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {path} (random weights, preset {preset})")
