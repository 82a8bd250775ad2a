"""``spillover verify`` and ``QuantizedCheckpoint.verify``: a good directory passes, each kind of damage is named."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from compute.cli import main as spillover
from quantizer.checkpoint import QuantizedCheckpoint
from quantizer.format import MANIFEST_NAME, FormatError, read_manifest


def run_verify(*args: str):
    return CliRunner().invoke(spillover, ["verify", *args])


@pytest.fixture
def damaged(tiny_q, tmp_path) -> Path:
    """A private copy of ``tiny_q`` that a test may damage."""
    copy = tmp_path / "q"
    shutil.copytree(tiny_q, copy)
    return copy


def first_shard(path: Path) -> Path:
    return path / read_manifest(path).shards[0].file


def test_a_good_directory_verifies(tiny_q, tiny_q_tied):
    for path in (tiny_q, tiny_q_tied):
        result = run_verify(str(path))
        assert result.exit_code == 0, result.output
        manifest = read_manifest(path)
        assert f"{len(manifest.shards)} shards" in result.stdout and "sha256 checked" in result.stdout


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # inside the last tensor's data: same size, different content
    path.write_bytes(bytes(data))


def test_a_corrupt_byte_fails_the_checksum_but_not_the_size_check(damaged):
    shard = first_shard(damaged)
    flip_one_byte(shard)
    result = run_verify(str(damaged))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip() == f"Error: shard {shard} does not match its sha256 in the manifest"
    assert run_verify(str(damaged), "--no-checksums").exit_code == 0


def test_a_missing_shard_is_named(damaged):
    shard = first_shard(damaged)
    shard.unlink()
    result = run_verify(str(damaged))
    assert result.exit_code == 1 and result.stderr.strip() == f"Error: shard {shard} is missing"


def test_a_truncated_shard_is_named_with_both_sizes(damaged):
    shard = first_shard(damaged)
    size = shard.stat().st_size
    os.truncate(shard, size - 7)
    result = run_verify(str(damaged), "--no-checksums")
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: shard {shard} has {size - 7} bytes, the manifest says {size}"


def test_a_manifest_that_disagrees_with_the_shard_headers_is_refused(damaged):
    manifest_path = damaged / MANIFEST_NAME
    raw = json.loads(manifest_path.read_text())
    entry = next(t for t in raw["tensors"] if t["name"].endswith(".scales"))
    entry["shape"] = [entry["shape"][0], entry["shape"][1] + 1]
    manifest_path.write_text(json.dumps(raw))
    with pytest.raises(FormatError, match=rf"tensor '{entry['name']}' in .* the manifest says BF16"):
        QuantizedCheckpoint(damaged).verify()


def test_a_linear_without_its_scales_is_refused(damaged):
    manifest_path = damaged / MANIFEST_NAME
    raw = json.loads(manifest_path.read_text())
    module = raw["units"][0]["linears"][0]
    raw["tensors"] = [t for t in raw["tensors"] if t["name"] != module + ".scales"]
    manifest_path.write_text(json.dumps(raw))
    result = run_verify(str(damaged))
    assert result.exit_code == 1 and f"has no tensor {module}.scales" in result.stderr


def test_not_a_spillover_directory(tiny_hf, tmp_path):
    result = run_verify(str(tiny_hf))
    assert result.exit_code == 1 and result.stderr.strip() == (
        f"Error: {tiny_hf} is not a spillover-int4 model: {MANIFEST_NAME} is missing"
    )
    assert run_verify(str(tmp_path / "absent")).stderr.strip() == f"Error: {tmp_path / 'absent'} is not a directory"
