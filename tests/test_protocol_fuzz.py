"""Malformed input against a live loader process: every request gets an answer and the loader keeps serving.

Hypothesis throws garbage bytes, random msgpack values, valid messages with a field dropped, added or given
a value of the wrong type, and multi-frame messages at a real ``spillover loader`` over its real socket;
each must be answered with an ``Error`` (or, for a well-formed message the loader accepts, its answer).
Then a real ``LoaderClient`` connects and streams every unit, so "keeps serving" means serving weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from protocol.client import LoaderClient, LoaderError
from protocol.codec import MAX_MESSAGE_BYTES, ProtocolError, decode, encode
from protocol.messages import PROTOCOL_VERSION, Error, GetStats, Hello, Message, SetPolicy, Shutdown
from protocol.sockets import ZMQ_MAX_MESSAGE_BYTES
from test_loader_process import budget_for, start_loader, stop, unit_sizes

REPLY_TIMEOUT_MS = 5000


@pytest.fixture(scope="module")
def loader(tiny_q, tmp_path_factory):
    sizes = unit_sizes(tiny_q)
    handle = start_loader(tiny_q, tmp_path_factory.mktemp("fuzz"), budget_for(tiny_q, 2 * max(sizes.values())), "stream", "--ring-slots", "2")
    yield handle
    stop(handle.proc)


@pytest.fixture
def peer(loader):
    """A raw DEALER on the loader's socket, as a misbehaving compute process would have."""
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(loader.address)
    yield sock
    sock.close()
    context.term()


def exchange(sock: zmq.Socket, *frames: bytes) -> Message | None:
    """Send ``frames`` as one message; the loader's decoded answer, or None if none came."""
    sock.send_multipart(list(frames))
    if not sock.poll(REPLY_TIMEOUT_MS):
        return None
    return decode(sock.recv())


VALID_BODIES = [
    {"type": "get_stats"},
    {"type": "set_policy", "policy": "stream", "ring_slots": None, "prefetch_depth": None},
    {"type": "hello", "protocol_version": PROTOCOL_VERSION, "pid": 1},
    {"type": "error", "code": "x", "message": "y"},
    {"type": "plan", "protocol_version": PROTOCOL_VERSION, "generation": 0},
]
plain = st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats() | st.text(max_size=20) | st.binary(max_size=20)
values = st.recursive(plain, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@st.composite
def mutated_bodies(draw) -> bytes:
    body = dict(draw(st.sampled_from(VALID_BODIES)))
    key = draw(st.sampled_from(sorted(body)))
    action = draw(st.sampled_from(["drop", "replace", "add"]))
    if action == "drop":
        del body[key]
    elif action == "replace":
        body[key] = draw(values)
    else:
        body[draw(st.text(min_size=1, max_size=8))] = draw(values)
    return msgpack.packb(body, use_bin_type=True)


payloads = st.one_of(
    st.binary(max_size=256),
    values.map(lambda v: msgpack.packb(v, use_bin_type=True)),
    mutated_bodies(),
)


def _would_change_the_loader(payload: bytes) -> bool:
    """A well-formed Hello or Shutdown is not malformed input: it would attach a process or stop the loader."""
    try:
        return isinstance(decode(payload), (Hello, Shutdown))
    except ProtocolError:
        return False


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=payloads, split=st.booleans())
def test_malformed_input_is_answered_and_the_loader_keeps_serving(loader, peer, payload, split):
    assume(not _would_change_the_loader(payload))
    frames = (payload[: len(payload) // 2], payload[len(payload) // 2 :]) if split else (payload,)
    reply = exchange(peer, *frames)
    assert reply is not None, f"no answer to {payload[:40]!r}"
    assert loader.proc.poll() is None, "the loader died"
    if split or not _decodes(payload):
        assert isinstance(reply, Error) and reply.code == "bad_message", reply
    else:
        assert isinstance(reply, Error) or reply.TYPE == "stats", reply


def _decodes(payload: bytes) -> bool:
    try:
        decode(payload)
        return True
    except ProtocolError:
        return False


def test_oversized_messages(loader, peer):
    reply = exchange(peer, b"\x00" * (MAX_MESSAGE_BYTES + 1))
    assert isinstance(reply, Error) and "over the" in reply.message
    # beyond zmq's own limit the connection is dropped without an answer; the loader carries on
    peer.send(b"\x00" * (ZMQ_MAX_MESSAGE_BYTES + 1))
    time.sleep(0.5)
    assert loader.proc.poll() is None
    with LoaderClient.connect(loader.address, timeout_s=10) as client:
        assert client.stats().policy == "stream"


def test_hello_and_set_policy_are_checked(loader, peer, tiny_q):
    reply = exchange(peer, encode(Hello(protocol_version=PROTOCOL_VERSION + 1, pid=os.getpid())))
    assert isinstance(reply, Error) and reply.code == "version"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    reply = exchange(peer, encode(Hello(protocol_version=PROTOCOL_VERSION, pid=dead.pid)))
    assert isinstance(reply, Error) and f"pid {dead.pid}" in reply.message
    reply = exchange(peer, encode(SetPolicy(policy="resident", ring_slots=None, prefetch_depth=None)))
    assert isinstance(reply, Error) and reply.code == "not_attached"
    assert exchange(peer, encode(GetStats())).TYPE == "stats"  # anyone may ask for stats

    with LoaderClient.connect(loader.address, timeout_s=10) as client:
        first = client.plan.ring.order[0]
        client.acquire(first)
        # while a streamed unit is held, neither a reconnect nor a policy switch may move it
        reply = exchange(peer, encode(Hello(protocol_version=PROTOCOL_VERSION, pid=os.getpid())))
        assert isinstance(reply, Error) and reply.code == "busy"
        client.release(first)
        with pytest.raises(LoaderError, match="unknown policy"):
            client.set_policy("no-such-policy")
        with pytest.raises(LoaderError, match="is too small") as refused:
            client.set_policy("resident")
        assert refused.value.code == "budget"
        assert client.plan.policy == "stream"  # a refused switch leaves the old plan in force
        client.finish_pass()  # the rest of the pass that began with ``first``
        for unit in client.plan.units:  # and the loader still streams every unit
            views = client.acquire(unit.name)
            assert views and all(v.numel() > 0 for v in views.values())
            client.release(unit.name)
    assert loader.proc.poll() is None


def test_set_policy_is_refused_while_a_streamed_unit_is_held(loader, peer):
    """The loader's own check, not the client's: a raw compute holding access 0 (by the counters) asks to switch."""
    from protocol.messages import Plan
    from protocol.ring import ACQUIRED, RELEASED, RingCounters

    plan = exchange(peer, encode(Hello(protocol_version=PROTOCOL_VERSION, pid=os.getpid())))
    assert isinstance(plan, Plan) and plan.ring.order
    counters = RingCounters.attach(plan.counters)
    try:
        counters[ACQUIRED] = 1  # access 0 taken, not released
        switch = encode(SetPolicy(policy="stream", ring_slots=2, prefetch_depth=None))
        reply = exchange(peer, switch)
        assert isinstance(reply, Error) and reply.code == "busy"
        counters[RELEASED] = 1
        reply = exchange(peer, switch)
        assert isinstance(reply, Plan) and reply.generation == plan.generation + 1
    finally:
        counters.close()
