"""``spillover serve``: the model behind an OpenAI-compatible HTTP API (``compute.serve.app``) on uvicorn.

It takes ``spillover run``'s model, budget and sampling options (``compute.run.MODEL_OPTIONS``: the sampling
ones become the defaults of requests that leave them out, ``-n`` the default ``max_tokens``) and its own:
``--host`` (default 127.0.0.1: loopback only), ``--port`` (0: any free port), ``--api-key`` (or
``$SPILLOVER_API_KEY``), ``--max-batch`` and ``--kv-tokens`` (the loader's planner counts the paged KV pool they
ask for), ``--max-pass-tokens`` (what one batched pass carries at most: new prompts are fed in what the running
streams' rows leave of it, so a smaller value shortens the stall when prompts arrive, at the cost of more passes
to prefill them), ``--max-waiting``, ``--served-model-name``, ``--shutdown-grace``. Like ``spillover run`` it starts the
loader (or uses ``--connect``'s), builds the engine on the loader's plan (``compute.batch_engine.BatchEngine``
when the plan's batch is more than one sequence, else the one-conversation ``compute.engine.Engine``) and puts a
``compute.scheduler.Scheduler`` over it.

Speculative decoding (``--draft-model`` or ``--speculate ngram``, with ``--draft-tokens``: ``spillover run``'s
options, checked as it checks them) serves one conversation at a time: the one-conversation engine with its
drafter (``compute.session.build_engine``, which also holds the draft model resident and checks its tokenizer),
``--max-batch`` 1 by default, and a larger ``--max-batch`` refused (``click.UsageError``). The loader is started
with the draft model, so its planner counts it. ``GET /health`` then reports what speculation did.

The listening socket is bound before the loader starts (a port in use is one line, at once). When the server
listens it prints ``spillover: serving MODEL at http://HOST:PORT/v1 …`` on stderr. The first SIGINT or
SIGTERM stops accepting connections, lets running requests go on for ``--shutdown-grace`` seconds, then
cancels the rest (their streams end with finish reason "abort" and ``[DONE]``), stops the scheduler and the
loader, and exits 0; a second one forces the exit. If the loader dies, every request in flight gets a 503
(streams an error event), and the server stops and exits 1 naming the loader.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import re
import socket
from collections.abc import Callable

import click
import uvicorn

from compute.resolve import ResolvedModel
from compute.run import (
    RunConfig,
    RunError,
    build_config,
    drive,
    loader_address,
    model_options,
    resolved_draft,
    share_cores_with_loader,
)
from protocol.launch import LoaderCommand

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 15.0  # the loader is ready before anyone connects, so the handshake is quick
# uvicorn's own limit on a graceful shutdown, beyond --shutdown-grace: the streams' last events and [DONE]
SHUTDOWN_MARGIN_S = 15.0
LISTEN_BACKLOG = 2048  # uvicorn's default
DEFAULT_MAX_BATCH = 16  # --max-batch without speculative decoding


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """The options of one ``spillover serve``, checked."""

    run: RunConfig  # the model, budget, loader and sampling defaults, as ``spillover run`` reads them
    host: str  # address to listen on
    port: int  # 0 = any free port
    api_key: str | None  # None: no key needed
    max_waiting: int  # requests queued beyond the running ones before 429
    max_pass_tokens: int | None  # tokens one batched pass carries at most; None: the plan's prefill chunk
    model_id: str  # the model's name in the API
    shutdown_grace_s: float  # seconds running requests may go on after SIGINT/SIGTERM


# fmt: off
@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. 0.0.0.0 listens on every interface: then set --api-key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on; 0 = any free port (printed when listening).")
@click.option("--api-key", envvar="SPILLOVER_API_KEY", metavar="KEY",
              help="Require 'Authorization: Bearer KEY' on every /v1 request. [env: SPILLOVER_API_KEY]")
@click.option("--max-batch", type=click.IntRange(min=1),
              help="Sequences one forward pass serves at most; 1 = the one-conversation engine (its own CUDA "
                   f"graphs). [default: {DEFAULT_MAX_BATCH}; with --draft-model or --speculate: 1, the only value "
                   "they take]")
@click.option("--kv-tokens", type=click.IntRange(min=1),
              help="Positions of the paged KV pool all sequences share (the budget counts it). [default: the "
                   "planner's: one context's memory, at least --max-context]")
@click.option("--max-pass-tokens", type=click.IntRange(min=2),
              help="Tokens one pass carries at most, a row for each running request and chunks of new prompts in "
                   "the rest: smaller keeps streams flowing while prompts prefill, larger prefills in fewer passes. "
                   "More than --max-batch; with --max-batch above 1. [default: the plan's prefill chunk]")
@click.option("--max-waiting", type=click.IntRange(min=0), default=256, show_default=True,
              help="Requests queued beyond the running ones; more are refused with 429.")
@click.option("--served-model-name", metavar="NAME", help="The model's name in the API. [default: --model as given]")
@click.option("--shutdown-grace", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Seconds running requests may go on after SIGINT/SIGTERM before they are cancelled.")
@click.pass_context
# fmt: on
def serve(ctx: click.Context, **options) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions).

    Speculative decoding (--draft-model or --speculate ngram) serves one conversation at a time: --max-batch is 1
    then (requests queue and run in turn), and GET /health reports tokens per target pass and the draft's share of
    the time."""
    options["max_batch"] = _max_batch(options)
    run = build_config(options, verbose=ctx.find_root().params.get("verbose", 0))
    if options["api_key"] is not None and not options["api_key"].strip():
        raise click.BadParameter("the key is empty", param_hint="--api-key")
    config = ServeConfig(
        run=run,
        host=options["host"],
        port=options["port"],
        api_key=options["api_key"],
        max_waiting=options["max_waiting"],
        max_pass_tokens=_max_pass_tokens(options),
        model_id=options["served_model_name"] or run.model or "demo",
        shutdown_grace_s=options["shutdown_grace"],
    )
    drive(ctx, run, functools.partial(_serve, config))


def _max_pass_tokens(options: dict) -> int | None:
    """``--max-pass-tokens``, checked against ``--max-batch`` (``options["max_batch"]`` already decided)."""
    from compute.batching import check_pass_tokens

    tokens = options["max_pass_tokens"]
    if tokens is not None and options["max_batch"] == 1:
        raise click.UsageError("--max-pass-tokens sets how batched passes share their tokens: it needs --max-batch "
                               "above 1")  # fmt: skip
    try:
        check_pass_tokens(tokens, options["max_batch"])
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--max-pass-tokens") from None
    return tokens


def _max_batch(options: dict) -> int:
    """``--max-batch``, or its default: ``DEFAULT_MAX_BATCH``, or 1 with speculative decoding, which serves one
    conversation at a time (``click.UsageError`` for a larger one asked for with it)."""
    drafting = "--draft-model" if options["draft_model"] else "--speculate ngram" if options["speculate"] else None
    if options["max_batch"] is None:
        return 1 if drafting else DEFAULT_MAX_BATCH
    if drafting and options["max_batch"] > 1:
        raise click.UsageError(
            f"speculative decoding ({drafting}) serves one conversation at a time: drop --max-batch or pass "
            "--max-batch 1"
        )
    return options["max_batch"]


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``. Its protocol must say TCP (as getaddrinfo's does): asyncio turns
    Nagle's algorithm off only on such sockets, and with it on each small response waited ~40 ms for an ACK."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = found[0]
        listener = socket.socket(family, kind, proto)
    except OSError as e:
        raise RunError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(LISTEN_BACKLOG)
    except OSError as e:
        listener.close()
        raise RunError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return listener


def _serve(config: ServeConfig, run: RunConfig, model: ResolvedModel, loader_command: LoaderCommand) -> None:
    # Imported here: transformers is slow to import, and --help does not need it.
    from compute.batch_engine import BatchEngine
    from compute.draft_model import DraftModelError
    from compute.scheduler import Scheduler
    from compute.session import build_engine
    from protocol.client import LoaderClient, LoaderError
    from protocol.sockets import AddressError
    from quantizer.checkpoint import QuantizedCheckpoint

    share_cores_with_loader(run.device)
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(_listen(config.host, config.port))
        address, launched = loader_address(stack, run, loader_command)

        def loader_failed(message: str) -> RunError:
            code = launched.exit_code() if launched else None
            return RunError(message + (f" (it exited with code {code})" if code is not None else ""))

        try:
            client = stack.enter_context(LoaderClient.connect(address, timeout_s=CONNECT_TIMEOUT_S))
        except (LoaderError, AddressError) as e:
            raise loader_failed(f"could not connect to the loader at {address}: {e}") from None
        plan = client.plan  # with --connect, the loader's max_batch, KV pool and context are the ones in force
        try:
            if plan.max_batch > 1 and not (run.speculate or run.draft_model):
                engine = BatchEngine.for_plan(QuantizedCheckpoint(model.path), client, device=run.device)
            else:  # speculation is one conversation's, even on a batch loader's plan (its pool holds a context)
                draft = resolved_draft(run, loader_command)
                engine = build_engine(client, model, run, draft=draft, address=address)
        except LoaderError as e:
            raise loader_failed(f"the loader (pid {plan.loader_pid}) failed: {e}") from None
        except DraftModelError as e:
            raise RunError(str(e)) from None
        try:
            scheduler = Scheduler(engine, max_batch=plan.max_batch, max_waiting=config.max_waiting,
                                  max_pass_tokens=config.max_pass_tokens)  # fmt: skip
        except ValueError as e:  # --connect: the loader's batch, not --max-batch, meets --max-pass-tokens here
            raise RunError(f"--max-pass-tokens: {e}") from None
        scheduler.start()
        stack.callback(scheduler.close, drain=False)
        failure = asyncio.run(_http(config, run, scheduler, listener, plan.loader_pid))
        if failure is not None:
            raise loader_failed(failure)


async def _http(config: ServeConfig, run: RunConfig, scheduler, listener: socket.socket, loader_pid: int) -> str | None:
    """Serve until a signal or a failure; return the failure's message, or None after a signal."""
    from compute.serve.app import STREAM_EXIT_MARGIN_S, Service, create_app
    from compute.serve.bridge import LoaderWatch, SchedulerBridge
    from compute.serve.schemas import SamplingDefaults

    loop = asyncio.get_running_loop()
    server: _Server | None = None

    def stop_serving(_message: str) -> None:
        server.should_exit = True

    bridge = SchedulerBridge(scheduler, loop, on_fatal=stop_serving)
    service = Service(
        bridge=bridge,
        tokenizer=scheduler.tokenizer,
        model_id=config.model_id,
        defaults=SamplingDefaults(
            temperature=run.temperature,
            top_p=run.top_p,
            top_k=run.top_k,
            repetition_penalty=run.repetition_penalty,
            max_tokens=run.max_new_tokens,
        ),
        api_key=config.api_key,
        shutdown_grace_s=config.shutdown_grace_s,
    )
    uvicorn_config = uvicorn.Config(
        create_app(service),
        log_level="info" if run.verbose else "warning",
        access_log=run.verbose > 0,
        lifespan="off",
        ws="none",
        timeout_graceful_shutdown=config.shutdown_grace_s + STREAM_EXIT_MARGIN_S + SHUTDOWN_MARGIN_S,
    )

    def on_exit_signal() -> None:
        loop.call_soon_threadsafe(bridge.shut_down, config.shutdown_grace_s)

    server = _Server(uvicorn_config, on_exit_signal=on_exit_signal, ready_line=_ready_line(config, listener, scheduler))
    with LoaderWatch(bridge, loader_pid):
        await server.serve(sockets=[listener])
    return bridge.failure


# What the line below promises a process that started the server: once it is printed, the server answers at URL.
READY_PATTERN = re.compile(r"spillover: serving '.*' at (http://\S+)/v1 ")


def _ready_line(config: ServeConfig, listener: socket.socket, scheduler) -> str:
    host, port = listener.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    drafter = getattr(scheduler.engine, "drafter", None)  # a BatchEngine has none
    return (
        f"spillover: serving '{config.model_id}' at http://{shown}:{port}/v1 "
        f"(max batch {scheduler.max_batch}, context {scheduler.max_context} tokens"
        f"{f', speculative decoding ({drafter.name})' if drafter is not None else ''}"
        f"{', API key required' if config.api_key else ''}); Ctrl-C stops"
    )


class _Server(uvicorn.Server):
    """uvicorn's server: the first SIGINT/SIGTERM starts our shutdown, a second forces the exit. The signal is not
    raised again once the server is done (as uvicorn does by default): the exit status is ours."""

    def __init__(self, config: uvicorn.Config, *, on_exit_signal: Callable[[], None], ready_line: str):
        super().__init__(config)
        self._on_exit_signal = on_exit_signal
        self._ready_line = ready_line

    def handle_exit(self, sig, frame) -> None:
        if self.should_exit:
            self.force_exit = True
            return
        self.should_exit = True
        self._on_exit_signal()

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            click.echo(self._ready_line, err=True)
