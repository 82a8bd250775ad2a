"""layout_units: every qweight in manifest order, back to back, then every scales tensor; blocks and units aligned."""

from __future__ import annotations

import math
import random

import pytest

from loader.layout import ALIGNMENT, layout_units
from quantizer.format import FormatError, Manifest, TensorEntry, UnitEntry


def random_manifest(rng: random.Random, *, layers: int, lm_head: bool) -> tuple[Manifest, dict[str, tuple[int, int]]]:
    """A manifest (no files) of Linears with random shapes; returns it and {linear: (out, in)}."""
    shapes: dict[str, tuple[int, int]] = {}
    units = []
    for layer in range(layers):
        names = [f"model.layers.{layer}.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")]
        for name in names:
            shapes[name] = (rng.randrange(1, 300), 128 * rng.randrange(1, 5))
        units.append(UnitEntry(name=f"layers.{layer}", linears=tuple(names)))
    if lm_head:
        shapes["lm_head"] = (rng.randrange(1, 300), 128 * rng.randrange(1, 5))
        units.append(UnitEntry(name="lm_head", linears=("lm_head",)))
    tensors = [TensorEntry(name="model.embed_tokens.weight", dtype="BF16", shape=(7, 128), file="a.safetensors")]
    for name, (out_features, in_features) in reversed(shapes.items()):  # tensor list order must not matter
        tensors.append(TensorEntry(name=name + ".scales", dtype="BF16", shape=(out_features, in_features // 128), file="a.safetensors"))
        tensors.append(TensorEntry(name=name + ".qweight", dtype="U8", shape=(out_features, in_features // 2), file="b.safetensors"))
    manifest = Manifest(architecture="Qwen2ForCausalLM", source="test", units=tuple(units), tensors=tuple(tensors), shards=())
    return manifest, shapes


@pytest.mark.parametrize("lm_head", [True, False])
def test_layout_order_alignment_and_sizes(lm_head):
    rng = random.Random()
    manifest, shapes = random_manifest(rng, layers=rng.randrange(1, 5), lm_head=lm_head)
    units = layout_units(manifest)
    assert [u.name for u in units] == [u.name for u in manifest.units]
    assert [u.index for u in units] == list(range(len(units)))
    for unit, entry in zip(units, manifest.units):
        expected_names = [linear + suffix for suffix in (".qweight", ".scales") for linear in entry.linears]
        assert [s.name for s in unit.tensors] == expected_names
        end = 0
        for slot in unit.tensors:
            out_features, in_features = shapes[slot.name.rsplit(".", 1)[0]]
            if slot.name.endswith(".qweight"):
                assert (slot.dtype, slot.shape) == ("U8", (out_features, in_features // 2))
                assert slot.offset % 64 == 0  # the GEMV's 16-byte loads
            else:
                assert (slot.dtype, slot.shape) == ("BF16", (out_features, in_features // 128))
            assert slot.nbytes == math.prod(slot.shape) * (1 if slot.dtype == "U8" else 2)
            first_scales = slot.name == entry.linears[0] + ".scales"
            if slot is unit.tensors[0] or first_scales:  # each block starts aligned, with no more padding than that
                assert slot.offset % ALIGNMENT == 0 and end <= slot.offset < end + ALIGNMENT
            else:  # back to back inside a block: adjacent Linears form one matrix
                assert slot.offset == end
            end = slot.offset + slot.nbytes
        assert unit.nbytes % ALIGNMENT == 0 and end <= unit.nbytes < end + ALIGNMENT
        assert unit.slot(unit.tensors[-1].name) == unit.tensors[-1]


def test_layout_of_a_missing_tensor_names_it():
    manifest, _ = random_manifest(random.Random(), layers=2, lm_head=False)
    gone = "model.layers.1.mlp.down_proj.scales"
    broken = Manifest(**{**manifest.__dict__, "tensors": tuple(t for t in manifest.tensors if t.name != gone)})
    with pytest.raises(FormatError, match=f"unit 'layers.1': tensor '{gone}' is not in the manifest"):
        layout_units(broken)


def test_unknown_tensor_in_a_unit_names_the_unit_and_its_tensors():
    manifest, _ = random_manifest(random.Random(), layers=1, lm_head=False)
    unit = layout_units(manifest)[0]
    with pytest.raises(KeyError, match="layers.0.*has no tensor 'nope'"):
        unit.slot("nope")
