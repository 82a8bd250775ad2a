"""``synthesize``: a spillover-int4 model with random weights, written directly in the quantized format.

For benchmarks and demos on machines without the real checkpoint: the directory is complete (config.json,
generation_config.json, a working tokenizer with the DeepSeek-R1 chat template, shards, manifest with sha256) and
runs through the real pipeline; only the numbers are made up. They are chosen so activations stay finite:

* packed INT4 bytes uniform over all 256 values (nibbles uniform in [-8, 7], std ~4.6) and bf16 scales of
  0.02 / 4.6 times a factor in [0.75, 1.25), so the dequantized weights have std ~0.02;
* embeddings and biases uniform with std 0.02; every norm weight 1.

Speed: the ~16.5 GB ``qwen2-32b`` preset must be quick to write, and the bytes' values do not matter beyond
the above. On CUDA each piece is drawn with ``torch.randint`` on the device. On CPU, drawing 16 GB would take
minutes on a small machine, so each piece is a window at a random offset into one random pool of
``POOL_BYTES`` drawn once: the values repeat across tensors, but every tensor differs and the cost is the disk
write. Pieces are at most ``PIECE_BYTES``, so memory stays bounded whatever the preset. The same seed on the same
kind of device gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from quantizer.devices import resolve_device
from quantizer.model_spec import ModelSpec, describe_model
from quantizer.tokenizer import build_tokenizer
from quantizer.writer import (
    PlannedTensor,
    ShardWriter,
    check_destination,
    linear_group,
    plan_shards,
    planned_file_bytes,
    write_model_directory,
)

log = logging.getLogger(__name__)

PIECE_BYTES = 64 << 20
POOL_BYTES = 2 * PIECE_BYTES
WEIGHT_STD = 0.02
UNIFORM_NIBBLE_STD = math.sqrt((16**2 - 1) / 12)  # std of a nibble uniform over [-8, 7]
UNIFORM_BYTE_STD = math.sqrt((256**2 - 1) / 12)  # std of a byte uniform over [0, 255]
BOS_ID, EOS_ID = 0, 1  # the tokenizer's first special tokens (quantizer/tokenizer.py)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SynthPreset:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int  # the model's; larger than the tokenizer's, as in real Qwen checkpoints
    tokenizer_vocab: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tied: bool  # tie_word_embeddings: no lm_head unit


PRESETS: dict[str, SynthPreset] = {
    # DeepSeek-R1-Distill-Qwen-32B's shapes.
    "qwen2-32b": SynthPreset(
        hidden_size=5120, intermediate_size=27648, num_layers=64, num_heads=40, num_kv_heads=8, vocab_size=152064,
        tokenizer_vocab=4000, max_position_embeddings=131072, rope_theta=1e6, rms_norm_eps=1e-5, tied=False,
    ),
    # Qwen2.5-0.5B's shapes: a draft model for the 32B in speculative decoding benchmarks (same tokenizer size).
    "qwen2-0.5b": SynthPreset(
        hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2, vocab_size=151936,
        tokenizer_vocab=4000, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6, tied=True,
    ),
    # Big enough that streaming is visible, quick on a CPU: run.sh's built-in demo (~12 MB).
    "demo": SynthPreset(
        hidden_size=512, intermediate_size=1536, num_layers=6, num_heads=8, num_kv_heads=2, vocab_size=2048,
        tokenizer_vocab=2000, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6, tied=False,
    ),
    # The tests' size (tests/conftest.py's tiny Qwen2).
    "tiny": SynthPreset(
        hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=320,
        tokenizer_vocab=300, max_position_embeddings=1024, rope_theta=1e6, rms_norm_eps=1e-6, tied=False,
    ),
}


def preset_config(preset: SynthPreset, num_layers: int) -> dict:
    """The config.json of a synthetic model, written by transformers' own Qwen2Config."""
    from transformers import Qwen2Config

    config = Qwen2Config(
        architectures=["Qwen2ForCausalLM"],
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads,
        vocab_size=preset.vocab_size,
        max_position_embeddings=preset.max_position_embeddings,
        rms_norm_eps=preset.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": preset.rope_theta},
        tie_word_embeddings=preset.tied,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        dtype="bfloat16",
    )
    return json.loads(config.to_json_string(use_diff=True))  # what save_pretrained would write


class RandomBytes:
    """Random uint8 pieces on the CPU: drawn on CUDA per piece, or windows into one random pool on CPU."""

    def __init__(self, device: torch.device, seed: int):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._offsets = torch.Generator().manual_seed(seed + 1)
        self._pool = None
        if device.type == "cpu":
            self._pool = torch.randint(0, 256, (POOL_BYTES,), dtype=torch.uint8, generator=self.generator)

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Random bytes of ``shape``, at most ``PIECE_BYTES`` of them."""
        count = math.prod(shape)
        if count > PIECE_BYTES:
            raise RuntimeError(f"RandomBytes.take of {count} bytes: pieces are at most {PIECE_BYTES}")
        if self._pool is None:
            drawn = torch.randint(0, 256, (count,), dtype=torch.uint8, device=self.device, generator=self.generator)
            return drawn.cpu().reshape(shape)
        start = int(torch.randint(0, POOL_BYTES - count + 1, (), generator=self._offsets))
        return self._pool[start : start + count].reshape(shape)


def _scales(random: RandomBytes, shape: tuple[int, ...]) -> torch.Tensor:
    factor = 0.75 + random.take(shape).to(torch.float32) / 512  # in [0.75, 1.25)
    return (factor * (WEIGHT_STD / UNIFORM_NIBBLE_STD)).to(torch.bfloat16)


def _dense(random: RandomBytes, shape: tuple[int, ...]) -> torch.Tensor:
    centred = random.take(shape).to(torch.float32) - 127.5
    return (centred * (WEIGHT_STD / UNIFORM_BYTE_STD)).to(torch.bfloat16)


def _row_pieces(shape: tuple[int, ...], itemsize: int) -> Iterator[tuple[int, ...]]:
    """Shapes of consecutive row pieces of ``shape``, each at most ``PIECE_BYTES`` (at least one row)."""
    rows = max(1, PIECE_BYTES // (itemsize * math.prod(shape[1:])))
    for start in range(0, shape[0], rows):
        yield (min(rows, shape[0] - start), *shape[1:])


def _write_random_tensors(writer: ShardWriter, spec: ModelSpec, random: RandomBytes, bar: tqdm) -> None:
    for param in spec.parameters:
        if param.role == "linear":
            qweight, scales = linear_group(param.name.removesuffix(".weight"), *param.shape)
            for piece in _row_pieces(qweight.shape, 1):
                writer.write(qweight.name, random.take(piece))
                bar.update(math.prod(piece))
            for piece in _row_pieces(scales.shape, 2):
                writer.write(scales.name, _scales(random, piece))
                bar.update(math.prod(piece) * 2)
        elif param.role == "norm":
            writer.write(param.name, torch.ones(param.shape, dtype=torch.bfloat16))
            bar.update(math.prod(param.shape) * 2)
        else:  # embedding, bias
            for piece in _row_pieces(param.shape, 2):
                writer.write(param.name, _dense(random, piece))
                bar.update(math.prod(piece) * 2)


def synthesize(
    dst: str | Path,
    *,
    preset: str,
    layers: int | None = None,
    device: str = "auto",
    overwrite: bool = False,
    seed: int = 0,
    shard_bytes: int = 2 * 10**9,
    progress: bool = True,
) -> Path:
    """Write a random-weight spillover-int4 model of ``preset`` (``PRESETS``), ``layers`` deep if given, to ``dst``.

    Raises ``ValueError`` for an unknown preset, a bad ``layers`` or device, and ``ModelWriteError`` when ``dst``
    cannot be written (exists without ``overwrite``, no space left); ``dst`` is then left as it was.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if layers is not None and layers < 1:
        raise ValueError(f"--layers must be at least 1, got {layers}")
    torch_device = resolve_device(device)
    dst = Path(dst).expanduser()
    check_destination(dst, overwrite=overwrite, needed_bytes=0)

    chosen = PRESETS[preset]
    config = preset_config(chosen, layers or chosen.num_layers)
    spec = describe_model(config)
    groups: list[list[PlannedTensor]] = [
        linear_group(p.name.removesuffix(".weight"), *p.shape)
        if p.linear
        else [PlannedTensor(name=p.name, dtype="BF16", shape=p.shape)]
        for p in spec.parameters
    ]
    shards = plan_shards(groups, shard_bytes)
    total = planned_file_bytes(shards)
    check_destination(dst, overwrite=overwrite, needed_bytes=total)
    log.info("synthesizing %s (%d layers, %.2f GB) on %s into %s", preset, config["num_hidden_layers"],
             total / 1e9, torch_device, dst)

    def write_tensors(writer: ShardWriter) -> None:
        random = RandomBytes(torch_device, seed)
        data_bytes = sum(s.data_bytes for s in shards)
        with tqdm(total=data_bytes, unit="B", unit_scale=True, desc=f"synth {preset}", disable=not progress) as bar:
            _write_random_tensors(writer, spec, random, bar)

    def write_files(staging: Path) -> None:
        from transformers import GenerationConfig

        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        GenerationConfig(
            bos_token_id=BOS_ID, eos_token_id=[EOS_ID], do_sample=True, temperature=0.6, top_p=0.95
        ).save_pretrained(str(staging))
        build_tokenizer(staging, chosen.tokenizer_vocab)

    return write_model_directory(
        dst,
        overwrite=overwrite,
        shards=shards,
        architecture=spec.architecture,
        source=f"synthetic:{preset}",
        units=spec.units,
        write_tensors=write_tensors,
        write_files=write_files,
    )
