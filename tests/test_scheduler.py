"""compute.scheduler: requests through a real loader process, their events, cancels, refusals, close and failure.

Every test drives the scheduler's engine thread against a live ``spillover loader`` child (``LaunchedLoader``)
through ``protocol.client.LoaderClient``; a reply is checked against the same request run alone through the same
engine, which is what "the output of a request does not depend on the others" means. (Not against a second engine
on in-process weights: the tiny random model's bf16 logits often tie exactly at the top, and the two weight forms'
last-bit differences then pick different tokens.)
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from compute.engine import ContextLengthError, Engine, FinishReason
from compute.launch import LaunchedLoader
from compute.sampling import SamplingParams
from compute.scheduler import (
    ErrorEvent,
    FinishEvent,
    GenerationRequest,
    QueueFullError,
    Scheduler,
    SchedulerClosedError,
    TokenEvent,
)
from loader.layout import pool_layouts
from loader.planner import plan_placement
from loader.policies import get_policy
from protocol.client import LoaderClient, LoaderGone
from protocol.launch import LoaderCommand
from quantizer.checkpoint import QuantizedCheckpoint

CONTEXT = 48
WAIT_S = 60.0  # the longest a test waits for a request to end


def resident_budget(qdir: Path) -> int:
    checkpoint = QuantizedCheckpoint(qdir)
    placement = plan_placement(
        budget_bytes=1 << 40, device="cpu", units=pool_layouts(checkpoint.manifest, "cpu"), config=checkpoint.config,
        max_context=CONTEXT, policy=get_policy("resident"),
    )  # fmt: skip
    return placement.total_bytes


class Recorder:
    """Collects each request's events (called from the engine thread) and lets a test wait for their end."""

    def __init__(self):
        self.events: dict[int, list] = {}
        self._ended = threading.Condition()
        self.pending: dict[int, list] = {}  # events that arrived before submit returned the id

    def callback(self, slot: list):
        def on_event(event):
            with self._ended:
                slot.append(event)
                self._ended.notify_all()

        return on_event

    def submit(self, scheduler: Scheduler, prompt, params) -> int:
        slot: list = []
        request_id = scheduler.submit(GenerationRequest(prompt_ids=tuple(prompt), params=params), self.callback(slot))
        self.events[request_id] = slot
        return request_id

    def wait(self, request_id: int) -> list:
        slot = self.events[request_id]
        with self._ended:
            ended = self._ended.wait_for(lambda: slot and not isinstance(slot[-1], TokenEvent), timeout=WAIT_S)
        assert ended, f"request {request_id} did not end within {WAIT_S} s: {slot}"
        return list(slot)


def tokens_of(events: list) -> tuple[int, ...]:
    return tuple(e.token_id for e in events if isinstance(e, TokenEvent))


def random_prompt(length: int) -> list[int]:
    return torch.randint(2, 300, (length,)).tolist()


@pytest.fixture(scope="module")
def loader(tiny_q):
    options = LoaderCommand(
        model=tiny_q, gpu_memory=resident_budget(tiny_q), policy="resident", device="cpu", max_context=CONTEXT
    )
    with LaunchedLoader.start(options) as launched:
        yield launched


@pytest.fixture
def scheduler(loader, tiny_q):
    client = LoaderClient.connect(loader.address, timeout_s=30)
    engine = Engine(QuantizedCheckpoint(tiny_q), client, device="cpu", max_context=CONTEXT, prefill_chunk=8)
    engine.eos_token_ids = frozenset()  # random weights: replies run their full length unless a test sets one
    scheduler = Scheduler(engine, max_batch=4, max_waiting=8)
    yield scheduler
    scheduler.close(drain=False)
    client.close()


def test_concurrent_requests_each_get_the_reply_they_get_alone(scheduler):
    scheduler.start()
    recorder = Recorder()
    greedy = SamplingParams(temperature=0, max_new_tokens=5)
    sampled = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_new_tokens=4)
    work = [(random_prompt(n), params) for n, params in [(9, greedy), (3, sampled), (14, greedy), (6, sampled)]]
    ids = [recorder.submit(scheduler, prompt, params) for prompt, params in work]
    assert ids == sorted(set(ids))
    replies = []
    for request_id, (prompt, params) in zip(ids, work):
        events = recorder.wait(request_id)
        assert all(e.request_id == request_id for e in events)
        replies.append(tokens_of(events))
        assert events[-1] == FinishEvent(request_id, FinishReason.LENGTH, len(prompt), params.max_new_tokens)
        assert sum(isinstance(e, (FinishEvent, ErrorEvent)) for e in events) == 1
    stats = scheduler.stats()
    assert (stats.running, stats.waiting, stats.tokens_generated) == (0, 0, 5 + 4 + 5 + 4)
    assert stats.passes >= 5 + 4 + 5 + 4 and stats.kv_free_tokens == stats.kv_total_tokens == CONTEXT
    # each request again, alone, through the same engine and weights (the loader's kernel form): the same reply
    for (prompt, params), together in zip(work, replies):
        assert tokens_of(recorder.wait(recorder.submit(scheduler, prompt, params))) == together


def test_a_reply_ends_at_eos_or_when_the_context_is_full(scheduler):
    prompt = random_prompt(7)
    full = scheduler.engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=6)).token_ids  # no EOS
    scheduler.engine.reset()  # the request then computes exactly this again (no prefix reused)
    scheduler.engine.eos_token_ids = frozenset({full[2]})
    assert scheduler.eos_token_ids == {full[2]}
    scheduler.start()
    recorder = Recorder()
    eos = recorder.wait(recorder.submit(scheduler, prompt, SamplingParams(temperature=0, max_new_tokens=6)))
    stop_at = full.index(full[2])
    assert tokens_of(eos) == full[: stop_at + 1] and eos[-1].finish_reason is FinishReason.EOS

    scheduler.engine.eos_token_ids = frozenset()
    long_prompt = random_prompt(CONTEXT - 3)
    ended = recorder.wait(recorder.submit(scheduler, long_prompt, SamplingParams(temperature=0, max_new_tokens=50)))
    assert ended[-1].finish_reason is FinishReason.CONTEXT and ended[-1].completion_tokens == 4  # 3 positions + 1


def test_cancel_stops_a_running_and_a_queued_request(scheduler):
    recorder = Recorder()
    started = threading.Event()
    long = SamplingParams(temperature=0, max_new_tokens=40)
    slot: list = []

    def first_events(event):
        slot.append(event)
        started.set()

    running = scheduler.submit(GenerationRequest(prompt_ids=tuple(random_prompt(5)), params=long), first_events)
    recorder.events[running] = slot
    queued = recorder.submit(scheduler, random_prompt(5), long)
    scheduler.cancel(queued)  # before the thread starts: it never runs
    scheduler.start()
    assert started.wait(WAIT_S)
    scheduler.cancel(running)
    scheduler.cancel(12345)  # unknown: nothing happens
    events = recorder.wait(running)
    assert events[-1].finish_reason is FinishReason.STOPPED and 1 <= events[-1].completion_tokens < 40
    assert recorder.wait(queued) == [FinishEvent(queued, FinishReason.STOPPED, 5, 0)]
    assert scheduler.stats().running == 0


def test_bad_requests_are_refused_at_submit_with_the_numbers(scheduler):
    params = SamplingParams(temperature=0, max_new_tokens=2)
    recorder = Recorder()
    with pytest.raises(ContextLengthError, match=f"the prompt has {CONTEXT} tokens but the context holds {CONTEXT}"):
        recorder.submit(scheduler, random_prompt(CONTEXT), params)
    with pytest.raises(ValueError, match="empty"):
        recorder.submit(scheduler, [], params)
    with pytest.raises(ValueError, match=r"\[320\] are outside the model's vocabulary \[0, 320\)"):
        recorder.submit(scheduler, [5, 320], params)
    for _ in range(scheduler.max_waiting):  # not started: every request waits
        recorder.submit(scheduler, random_prompt(3), params)
    with pytest.raises(QueueFullError, match="8 requests are already waiting"):
        recorder.submit(scheduler, random_prompt(3), params)
    assert scheduler.stats().waiting == 8


def test_close_with_drain_finishes_queued_requests_and_without_stops_them(scheduler):
    recorder = Recorder()
    params = SamplingParams(temperature=0, max_new_tokens=3)
    ids = [recorder.submit(scheduler, random_prompt(4), params) for _ in range(3)]
    scheduler.start()
    scheduler.close(drain=True)
    assert [recorder.wait(i)[-1].finish_reason for i in ids] == [FinishReason.LENGTH] * 3
    with pytest.raises(SchedulerClosedError, match="closing"):
        recorder.submit(scheduler, random_prompt(4), params)

    other = Scheduler(scheduler.engine, max_batch=1)
    queued = [recorder.submit(other, random_prompt(4), params) for _ in range(2)]
    other.close(drain=False)  # never started: the queued requests are stopped
    assert [recorder.wait(i)[-1] for i in queued] == [FinishEvent(i, FinishReason.STOPPED, 4, 0) for i in queued]


def test_a_dead_loader_fails_every_live_request_and_the_scheduler(tiny_q):
    # Streamed units: resident ones are plain views that outlive the loader, the ring notices its death.
    options = LoaderCommand(
        model=tiny_q, gpu_memory=resident_budget(tiny_q) + 2**20, policy="stream", device="cpu", max_context=CONTEXT
    )
    with LaunchedLoader.start(options) as launched, LoaderClient.connect(launched.address, timeout_s=30) as client:
        engine = Engine(QuantizedCheckpoint(tiny_q), client, device="cpu", max_context=CONTEXT, prefill_chunk=8)
        engine.eos_token_ids = frozenset()
        scheduler = Scheduler(engine, max_batch=2)
        recorder = Recorder()
        started = threading.Event()
        slot: list = []
        scheduler_request = GenerationRequest(
            prompt_ids=tuple(random_prompt(5)), params=SamplingParams(temperature=0, max_new_tokens=CONTEXT - 6)
        )

        def slow_events(event):  # slows the reply so the loader dies in the middle of it
            slot.append(event)
            started.set()
            time.sleep(0.05)

        running = scheduler.submit(scheduler_request, slow_events)
        recorder.events[running] = slot
        queued = recorder.submit(scheduler, random_prompt(4), SamplingParams(temperature=0, max_new_tokens=3))
        scheduler.start()
        assert started.wait(WAIT_S)
        os.kill(launched.pid, signal.SIGKILL)
        for request_id in (running, queued):
            last = recorder.wait(request_id)[-1]
            assert isinstance(last, ErrorEvent) and last.fatal and "engine stopped" in last.message
        assert isinstance(scheduler.failure, LoaderGone)
        with pytest.raises(SchedulerClosedError, match="engine has stopped"):
            recorder.submit(scheduler, random_prompt(3), SamplingParams(temperature=0, max_new_tokens=2))
        scheduler.close(drain=True)
