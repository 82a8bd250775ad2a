"""protocol/: every message's round trip and golden bytes, the codec's refusals, sockets, shared buffers, the ring."""

from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys
import time

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import messages
from protocol.codec import MAX_MESSAGE_BYTES, ProtocolError, decode, encode
from protocol.errors import LoaderError, LoaderGone, RingOrderError
from protocol.messages import (
    MESSAGE_TYPES,
    BudgetLine,
    CudaIpcHandle,
    Error,
    GetStats,
    Hello,
    Message,
    Ok,
    Plan,
    PolicyStats,
    RingSpec,
    SetPolicy,
    SharedBuffer,
    Shutdown,
    Stats,
    TensorPlacement,
    UnitPlacement,
)
from protocol.ring import ACQUIRED, FILLED, GENERATION, RELEASED, WAIT_NS, RingConsumer, RingCounters, RingProducer
from protocol.shared import attach_buffer, create_host_buffer
from protocol.sockets import AddressError, ComputeSocket, LoaderSocket, check_address, make_run_dir

CUDA = CudaIpcHandle(
    device=0, handle=bytes(range(4)), storage_bytes=1 << 20, storage_offset_bytes=0,
    ref_counter_handle=b"/torch_1_2", ref_counter_offset=3, event_handle=b"\x01\x02", event_sync_required=True,
)
EXAMPLES = {
    "hello": Hello(protocol_version=1, pid=4242),
    "plan": Plan(
        protocol_version=1, generation=2, policy="hybrid", loader_pid=99, device="cuda",
        pool=SharedBuffer(nbytes=1 << 20, path=None, cuda=CUDA),
        counters=SharedBuffer(nbytes=128, path="/dev/shm/r/counters", cuda=None),
        filled_events=(b"\x0a",), released_events=(b"\x0b",),
        units=(
            UnitPlacement(name="layers.0", index=0, nbytes=512, pool_offset=0, tensors=(
                TensorPlacement(name="a.qweight", offset=0, nbytes=256, dtype="U8", shape=(4, 64)),
                TensorPlacement(name="a.scales", offset=256, nbytes=8, dtype="BF16", shape=(4, 1)),
            )),
            UnitPlacement(name="lm_head", index=1, nbytes=256, pool_offset=None, tensors=()),
        ),
        ring=RingSpec(slots=2, slot_bytes=256, base_offset=512, prefetch_depth=1, order=("lm_head",)),
        max_context=64, prefill_chunk=32, max_batch=4, kv_tokens=128, budget_bytes=1 << 30, lines=(BudgetLine(what="KV cache", nbytes=4096),),
    ),
    "set_policy": SetPolicy(policy="stream", ring_slots=3, prefetch_depth=None),
    "get_stats": GetStats(),
    "stats": Stats(policy="stream", generation=3, uptime_seconds=1.5, policies=(
        PolicyStats(policy="stream", streamed_bytes=1000, fills=4, copy_seconds=0.25, resident_bytes=0,
                    resident_seconds=0.0, acquires=4, compute_wait_seconds=0.125),
    )),
    "shutdown": Shutdown(),
    "ok": Ok(),
    "error": Error(code="busy", message="already serving pid 7"),
}

# encode(EXAMPLES[tag]).hex(), written once by hand-checked encoding; a change here is a wire change
GOLDEN_HEX = {
    "hello": "83a474797065a568656c6c6fb070726f746f636f6c5f76657273696f6e01a3706964cd1092",
    "plan": (
        "de0012a474797065a4706c616eb070726f746f636f6c5f76657273696f6e01aa67656e65726174696f6e02a6706f6c696379a6"
        "687962726964aa6c6f616465725f70696463a6646576696365a463756461a4706f6f6c83a66e6279746573ce00100000a47061"
        "7468c0a46375646188a664657669636500a668616e646c65c40400010203ad73746f726167655f6279746573ce00100000b473"
        "746f726167655f6f66667365745f627974657300b27265665f636f756e7465725f68616e646c65c40a2f746f7263685f315f32"
        "b27265665f636f756e7465725f6f666673657403ac6576656e745f68616e646c65c4020102b36576656e745f73796e635f7265"
        "717569726564c3a8636f756e7465727383a66e6279746573cc80a470617468b32f6465762f73686d2f722f636f756e74657273"
        "a463756461c0ad66696c6c65645f6576656e747391c4010aaf72656c65617365645f6576656e747391c4010ba5756e69747392"
        "85a46e616d65a86c61796572732e30a5696e64657800a66e6279746573cd0200ab706f6f6c5f6f666673657400a774656e736f"
        "72739285a46e616d65a9612e71776569676874a66f666673657400a66e6279746573cd0100a56474797065a25538a573686170"
        "6592044085a46e616d65a8612e7363616c6573a66f6666736574cd0100a66e627974657308a56474797065a442463136a57368"
        "61706592040185a46e616d65a76c6d5f68656164a5696e64657801a66e6279746573cd0100ab706f6f6c5f6f6666736574c0a7"
        "74656e736f727390a472696e6785a5736c6f747302aa736c6f745f6279746573cd0100ab626173655f6f6666736574cd0200ae"
        "70726566657463685f646570746801a56f7264657291a76c6d5f68656164ab6d61785f636f6e7465787440ad70726566696c6c"
        "5f6368756e6b20a96d61785f626174636804a96b765f746f6b656e73cc80ac6275646765745f6279746573ce40000000a56c69"
        "6e65739182a477686174a84b56206361636865a66e6279746573cd1000"
    ),
    "set_policy": (
        "84a474797065aa7365745f706f6c696379a6706f6c696379a673747265616daa72696e675f736c6f747303ae707265666574"
        "63685f6465707468c0"
    ),
    "get_stats": "81a474797065a96765745f7374617473",
    "stats": (
        "85a474797065a57374617473a6706f6c696379a673747265616daa67656e65726174696f6e03ae757074696d655f7365636f"
        "6e6473cb3ff8000000000000a8706f6c69636965739188a6706f6c696379a673747265616dae73747265616d65645f627974"
        "6573cd03e8a566696c6c7304ac636f70795f7365636f6e6473cb3fd0000000000000ae7265736964656e745f627974657300"
        "b07265736964656e745f7365636f6e6473cb0000000000000000a8616371756972657304b4636f6d707574655f776169745f"
        "7365636f6e6473cb3fc0000000000000"
    ),
    "shutdown": "81a474797065a873687574646f776e",
    "ok": "81a474797065a26f6b",
    "error": (
        "83a474797065a56572726f72a4636f6465a462757379a76d657373616765b5616c72656164792073657276696e6720706964"
        "2037"
    ),
}


def test_every_message_class_is_registered_and_has_an_example():
    classes = {c for _, c in inspect.getmembers(messages, inspect.isclass) if issubclass(c, Message) and c is not Message}
    assert classes == set(MESSAGE_TYPES.values()), "a Message subclass is missing @register"
    assert set(EXAMPLES) == set(MESSAGE_TYPES) == set(GOLDEN_HEX), "every message type needs an example and golden bytes"
    for cls in classes:
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
        assert all(field.kw_only for field in dataclasses.fields(cls))


@pytest.mark.parametrize("tag", sorted(MESSAGE_TYPES))
def test_round_trip_and_golden_bytes(tag):
    message = EXAMPLES[tag]
    assert type(message).TYPE == tag
    data = encode(message)
    assert data.hex() == GOLDEN_HEX[tag], f"the wire form of {tag!r} changed: bump PROTOCOL_VERSION and the golden bytes"
    assert decode(data) == message


@settings(max_examples=30, deadline=None)
@given(
    pid=st.integers(min_value=0, max_value=2**62),
    policy=st.text(max_size=20),
    slots=st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1),
    seconds=st.floats(allow_nan=False),
    raw=st.binary(max_size=64),
)
def test_round_trip_of_random_values(pid, policy, slots, seconds, raw):
    for message in (
        Hello(protocol_version=pid, pid=pid),
        SetPolicy(policy=policy, ring_slots=slots, prefetch_depth=slots),
        Error(code=policy, message=policy * 3),
        Stats(policy=policy, generation=pid, uptime_seconds=seconds, policies=()),
        Plan(**{**dataclasses.asdict(EXAMPLES["plan"]), "filled_events": (raw, raw), "policy": policy} | _nested_plan()),
    ):
        assert decode(encode(message)) == message


def _nested_plan() -> dict:
    """The nested records of the example Plan, as objects (dataclasses.asdict flattens them to dicts)."""
    plan = EXAMPLES["plan"]
    return {"pool": plan.pool, "counters": plan.counters, "units": plan.units, "ring": plan.ring, "lines": plan.lines}


def _packed(body) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


HELLO = {"type": "hello", "protocol_version": 1, "pid": 7}
BAD_INPUT = {
    "empty": (b"", "not a msgpack message"),
    "garbage": (b"\xc1\xff\x00", "not a msgpack message"),
    "truncated": (encode(EXAMPLES["plan"])[:-3], "not a msgpack message"),
    "trailing bytes": (encode(EXAMPLES["ok"]) + b"\x00", "not a msgpack message"),
    "not a map": (_packed([1, 2]), "must be a msgpack map"),
    "no type": (_packed({"pid": 1}), "no str 'type'"),
    "unknown type": (_packed({"type": "launch_missiles"}), "unknown message type 'launch_missiles'"),
    "missing field": (_packed({"type": "hello", "pid": 7}), "hello: missing field(s) protocol_version"),
    "unknown field": (_packed({**HELLO, "extra": 1}), "hello: unknown field(s) extra"),
    "str for int": (_packed({**HELLO, "pid": "7"}), "hello.pid: expected int, got str"),
    "bool for int": (_packed({**HELLO, "pid": True}), "hello.pid: expected int, got bool"),
    "int for str": (_packed({"type": "error", "code": 1, "message": "m"}), "error.code: expected str, got int"),
    "str for bytes": (
        _packed({**dataclasses.asdict(EXAMPLES["plan"]), "type": "plan", "filled_events": ["x"]}),
        "plan.filled_events[0]: expected bytes",
    ),
    "nested wrong": (
        _packed({**dataclasses.asdict(EXAMPLES["plan"]), "type": "plan", "ring": {"slots": 2}}),
        "plan.ring: missing field(s) slot_bytes",
    ),
    "int for array": (_packed({"type": "stats", "policy": "x", "generation": 1, "uptime_seconds": 0.0, "policies": 3}), "expected an array"),
    "extension type": (msgpack.packb(msgpack.ExtType(5, b"x")), "extension type 5"),
    "oversized": (b"\x00" * (MAX_MESSAGE_BYTES + 1), "over the"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_decode_names_what_was_wrong(case):
    data, expected = BAD_INPUT[case]
    with pytest.raises(ProtocolError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        decode(data)


def test_encode_refuses_unregistered_and_oversized():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Rogue(Message):
        TYPE = "rogue"

    with pytest.raises(ProtocolError, match="not a registered message type"):
        encode(Rogue())
    with pytest.raises(ProtocolError, match="over the"):
        encode(Error(code="x", message="m" * MAX_MESSAGE_BYTES))


def test_addresses_must_be_private(tmp_path):
    run_dir = make_run_dir()
    try:
        assert (run_dir.stat().st_mode & 0o777) == 0o700
        assert check_address(f"ipc://{run_dir}/s") == f"ipc://{run_dir}/s"
        assert check_address("tcp://127.0.0.1:5555") == "tcp://127.0.0.1:5555"
        tmp_path.chmod(0o755)
        refused = [
            "tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://localhost:5555", "tcp://192.168.1.2:5555", "tcp://127.0.0.1:0",
            "tcp://127.0.0.1:99999", "inproc://x", "ipc://relative/s", f"ipc://{tmp_path}/s", f"ipc://{tmp_path}/missing/s",
        ]  # fmt: skip
        for address in refused:
            with pytest.raises(AddressError):
                check_address(address)
    finally:
        run_dir.rmdir()


def test_sockets_carry_messages_and_report_bad_frames():
    run_dir = make_run_dir()
    address = f"ipc://{run_dir}/s"
    loader, compute = LoaderSocket(address), ComputeSocket(address)
    try:
        assert loader.recv_from_compute(0.05) is None
        compute.send_to_loader(EXAMPLES["hello"])
        received = loader.recv_from_compute(5)
        assert received.message == EXAMPLES["hello"] and received.error is None
        loader.send_to_compute(received.peer, EXAMPLES["plan"])
        assert compute.recv_from_loader(5) == EXAMPLES["plan"]
        assert compute.recv_from_loader(0.05) is None

        compute._sock.send_multipart([b"a", b"b"])  # two frames: not a message
        received = loader.recv_from_compute(5)
        assert received.message is None and "one frame" in str(received.error)
        compute._sock.send(b"\xc1")
        assert "not a msgpack message" in str(loader.recv_from_compute(5).error)
    finally:
        compute.close()
        loader.close()
    assert not (run_dir / "s").exists()
    run_dir.rmdir()


def test_host_buffer_is_shared_between_mappings(tmp_path):
    tensor, shared = create_host_buffer(tmp_path / "pool", 4096)
    assert shared.nbytes == 4096 and shared.cuda is None
    other = attach_buffer(shared)
    values = torch.randint(0, 256, (4096,), dtype=torch.uint8)
    tensor.copy_(values)
    assert torch.equal(other, values)
    with pytest.raises(FileExistsError):
        create_host_buffer(tmp_path / "pool", 4096)
    with pytest.raises(ValueError, match="the plan says"):
        attach_buffer(SharedBuffer(nbytes=8192, path=shared.path, cuda=None))


def _ring(tmp_path, slots: int, depth: int, order: tuple[str, ...], loader_pid: int, timeout_s: float = 5.0):
    counters, _ = RingCounters.create(tmp_path / "counters")
    counters.reset(generation=1)
    spec = RingSpec(slots=slots, slot_bytes=16, base_offset=0, prefetch_depth=depth, order=order)
    consumer = RingConsumer(counters, spec, generation=1, loader_pid=loader_pid, timeout_s=timeout_s)
    return counters, RingProducer(counters, spec), consumer


def _fill_all(producer: RingProducer) -> list[tuple[int, int, str]]:
    fills = []
    while (fill := producer.next_fill()) is not None:
        fills.append(fill)
        producer.publish_fill(fill[0])
    return fills


def test_ring_schedule_follows_the_counters(tmp_path):
    """K = 2 slots, D = 2 ahead, S = 3 units: which access the loader may fill after each step of compute."""
    counters, producer, consumer = _ring(tmp_path, slots=2, depth=2, order=("a", "b", "c"), loader_pid=os.getpid())
    assert _fill_all(producer) == [(0, 0, "a"), (1, 1, "b")]  # D ahead of nothing acquired yet
    assert consumer.acquire("a") == 0 and counters[ACQUIRED] == 1
    assert _fill_all(producer) == []  # slot 0 still held by access 0
    consumer.release("a")
    assert counters[RELEASED] == 1
    assert _fill_all(producer) == [(2, 0, "c")]
    for name, slot in [("b", 1), ("c", 0)]:
        assert consumer.acquire(name) == slot
        consumer.release(name)
        _fill_all(producer)
    assert consumer.acquire("a") == 1  # the next pass: access 3 is unit a in slot 1
    assert counters[FILLED] == 5 and counters[WAIT_NS] == 0  # every acquire found its fill done


def test_ring_refuses_out_of_order_use(tmp_path):
    counters, producer, consumer = _ring(tmp_path, slots=2, depth=2, order=("a", "b", "c"), loader_pid=os.getpid())
    _fill_all(producer)
    with pytest.raises(RingOrderError, match="expects 'a'"):
        consumer.acquire("b")
    with pytest.raises(RingOrderError, match="no streamed unit is acquired"):
        consumer.release("a")
    consumer.acquire("a")
    consumer.acquire("b")
    with pytest.raises(RingOrderError, match="only 2 slots"):
        consumer.acquire("c")
    with pytest.raises(RingOrderError, match="oldest held is 'a'"):
        consumer.release("b")


def test_ring_wait_detects_a_dead_loader_and_a_stall(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    counters, _, consumer = _ring(tmp_path, slots=2, depth=2, order=("a",), loader_pid=dead.pid)
    started = time.monotonic()
    with pytest.raises(LoaderGone, match=f"pid {dead.pid}"):
        consumer.acquire("a")  # never filled: the wait must notice the loader is gone
    assert time.monotonic() - started < 2

    counters.close()
    (tmp_path / "counters").unlink()
    counters, _, consumer = _ring(tmp_path, slots=2, depth=2, order=("a",), loader_pid=os.getpid(), timeout_s=0.3)
    with pytest.raises(LoaderError, match="did not fill streamed access 0"):
        consumer.acquire("a")
    counters[GENERATION] = 5
    with pytest.raises(LoaderError, match="plan changed"):
        consumer.acquire("a")
