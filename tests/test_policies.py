"""Residency policies on synthetic units: what each keeps resident, what it streams, and the ring it asks for."""

from __future__ import annotations

import random

import pytest

from loader.layout import UnitLayout
from loader.policies import MIN_RING_SLOTS, POLICIES, Policy, Residency, get_policy


def make_units(sizes: list[int], lm_head: bool = False) -> list[UnitLayout]:
    names = [f"layers.{i}" for i in range(len(sizes) - lm_head)] + (["lm_head"] if lm_head else [])
    return [UnitLayout(name=name, index=i, nbytes=size, tensors=()) for i, (name, size) in enumerate(zip(names, sizes))]


def stretch_of(units: list[UnitLayout], streamed: tuple[str, ...]) -> list[int]:
    """Indices of the streamed units, checked to be one contiguous stretch of the cyclic order."""
    n = len(units)
    idx = sorted(u.index for u in units if u.name in streamed)
    starts = [i for i in idx if (i - 1) % n not in idx]
    assert len(starts) == 1 or len(idx) in (0, n), f"streamed units {streamed} are not one stretch"
    return idx


def check_consistent(units: list[UnitLayout], r: Residency) -> None:
    sizes = {u.name: u.nbytes for u in units}
    assert sorted(r.resident + r.streamed) == sorted(sizes) and not set(r.resident) & set(r.streamed)
    order = [u.name for u in units]
    assert list(r.resident) == [n for n in order if n in r.resident]  # execution order
    assert list(r.streamed) == [n for n in order if n in r.streamed]
    assert r.resident_bytes == sum(sizes[n] for n in r.resident)
    if r.streamed:
        assert r.slot_bytes == max(sizes[n] for n in r.streamed)
        assert r.ring_slots >= MIN_RING_SLOTS and 1 <= r.prefetch_depth <= r.ring_slots
    else:
        assert (r.ring_slots, r.prefetch_depth, r.slot_bytes) == (0, 0, 0)
    assert r.pool_bytes == r.resident_bytes + r.ring_slots * r.slot_bytes


def test_registry_and_unknown_names():
    assert set(POLICIES) >= {"resident", "stream", "hybrid"}
    for name, policy in POLICIES.items():
        assert isinstance(policy, Policy) and policy.name == name and get_policy(name) is policy and policy.summary
    with pytest.raises(ValueError, match="unknown policy 'fast'; valid policies: hybrid, resident, stream"):
        get_policy("fast")


def test_resident_keeps_everything_and_takes_no_ring_options():
    units = make_units([random.randrange(1, 1000) * 256 for _ in range(5)], lm_head=True)
    policy = get_policy("resident")
    r = policy.place(units, 10**12)
    check_consistent(units, r)
    assert r.streamed == () and r.pool_bytes == sum(u.nbytes for u in units)
    assert policy.minimum(units) == r
    with pytest.raises(ValueError, match="'resident' streams nothing"):
        policy.minimum(units, ring_slots=3)


def test_stream_puts_everything_through_the_ring():
    units = make_units([random.randrange(1, 1000) * 256 for _ in range(6)], lm_head=True)
    policy = get_policy("stream")
    r = policy.place(units, 10**12)
    check_consistent(units, r)
    assert r.resident == () and r.streamed == tuple(u.name for u in units)
    assert (r.ring_slots, r.prefetch_depth) == (3, 2)
    assert r.pool_bytes == 3 * max(u.nbytes for u in units)
    r = policy.minimum(units, ring_slots=2, prefetch_depth=1)
    assert (r.ring_slots, r.prefetch_depth, r.pool_bytes) == (2, 1, 2 * max(u.nbytes for u in units))
    assert policy.minimum(units, ring_slots=5).prefetch_depth == 2


@pytest.mark.parametrize("name", ["stream", "hybrid"])
@pytest.mark.parametrize(("slots", "depth", "message"), [(1, None, "--ring-slots 1 is too few"), (3, 4, "--prefetch-depth 4 must be between 1 and the ring's 3"), (2, 0, "--prefetch-depth 0")])
def test_ring_options_are_checked(name, slots, depth, message):
    with pytest.raises(ValueError, match=message):
        get_policy(name).minimum(make_units([256] * 4), ring_slots=slots, prefetch_depth=depth)


def test_hybrid_keeps_everything_resident_when_it_fits():
    units = make_units([1024] * 5 + [2048], lm_head=True)
    r = get_policy("hybrid").place(units, sum(u.nbytes for u in units))
    check_consistent(units, r)
    assert r.streamed == () and r.ring_slots == 0


def test_hybrid_streams_the_last_layers_and_keeps_a_big_lm_head():
    layer, head = 1000 * 256, 1600 * 256
    units = make_units([layer] * 10 + [head], lm_head=True)
    total = sum(u.nbytes for u in units)
    policy = get_policy("hybrid")
    # room for everything but 4 layers' worth: streaming 6 layers through 2 slots leaves 4 resident + lm_head
    r = policy.place(units, total - 4 * layer)
    check_consistent(units, r)
    assert r.streamed == tuple(f"layers.{i}" for i in range(4, 10)) and r.resident[-1] == "lm_head"
    assert (r.ring_slots, r.prefetch_depth, r.slot_bytes) == (2, 2, layer)
    assert r.pool_bytes == total - 4 * layer
    # one layer short of fitting: streaming 1 or 2 layers saves nothing with two slots; 3 is the least that fits
    r = policy.place(units, total - 1)
    assert r.streamed == ("layers.7", "layers.8", "layers.9")


@pytest.mark.parametrize("slots", [2, 3])
def test_hybrid_tiny_budgets_force_a_small_ring(slots):
    units = make_units([random.randrange(200, 300) * 256 for _ in range(4)] + [400 * 256], lm_head=True)
    policy = get_policy("hybrid")
    minimum = policy.minimum(units, ring_slots=slots)
    check_consistent(units, minimum)
    # the cheapest placement at all: nothing fits in less
    assert minimum.ring_slots == slots and minimum.streamed
    r = policy.place(units, minimum.pool_bytes, ring_slots=slots)
    check_consistent(units, r)
    assert r.pool_bytes <= minimum.pool_bytes and r.ring_slots == slots


def test_hybrid_is_the_best_contiguous_stretch_on_random_units():
    """Against brute force over every cyclic stretch: the placement fits, and no stretch keeps more resident."""
    rng = random.Random()
    policy = get_policy("hybrid")
    for _ in range(40):
        n = rng.randrange(1, 9)
        units = make_units([rng.randrange(1, 50) * 256 for _ in range(n)], lm_head=rng.random() < 0.5)
        slots = rng.choice([None, 2, 3])
        k = slots or 2
        total = sum(u.nbytes for u in units)
        options = [(total, total)]  # (pool, resident) of every candidate
        for start in range(n):
            for length in range(1, n + 1):
                picked = [units[(start + j) % n] for j in range(length)]
                resident = total - sum(u.nbytes for u in picked)
                options.append((resident + k * max(u.nbytes for u in picked), resident))
        cheapest = min(pool for pool, _ in options)
        assert policy.minimum(units, ring_slots=slots).pool_bytes == cheapest
        budget = rng.randrange(cheapest, total + 2 * 50 * 256)
        r = policy.place(units, budget, ring_slots=slots)
        check_consistent(units, r)
        stretch_of(units, r.streamed)
        assert r.pool_bytes <= budget
        assert r.resident_bytes == max(resident for pool, resident in options if pool <= budget)
