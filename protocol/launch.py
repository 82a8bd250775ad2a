"""How a loader process is started and how it says it is ready: its command line and its ready file.

Both are contracts between two processes, so each is one typed record with one encoder and one decoder:

* ``LoaderCommand``: every option of ``spillover loader`` (``python -m loader.main``). A launcher builds one and
  runs ``python -m loader.main *command.argv()``; the loader's click command is ``loader_command_options``
  applied to its entry point, and ``LoaderCommand.parse(argv)`` decodes with those same options, so what one side
  writes the other reads, field for field.
* ``ReadyFile``: what the loader writes, atomically, once it serves (``write``), and what the launcher reads back
  (``read``): the address to connect to and the loader's pid. ``encode``/``decode`` are its JSON.

Malformed input raises ``LaunchContractError`` naming what was wrong.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import click

from protocol.defaults import DEFAULT_MAX_CONTEXT, DEFAULT_POLICY, POLICY_NAMES
from protocol.sizes import SIZE


class LaunchContractError(ValueError):
    """A loader command line or ready file that does not follow the contract; the message says how."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoaderCommand:
    """The options of one loader process."""

    model: Path  # a spillover-int4 model directory
    gpu_memory: int  # bytes of device memory for BOTH processes together (--gpu-memory)
    policy: str = DEFAULT_POLICY  # the residency policy at start, one of POLICY_NAMES
    device: str | None = None  # "cuda" or "cpu"; None: cuda when available
    socket: str | None = None  # the address to bind: ipc:///DIR/NAME (DIR mode 0700) or tcp://127.0.0.1:PORT
    max_context: int = DEFAULT_MAX_CONTEXT  # tokens the KV cache is counted for
    max_batch: int = 1  # sequences per forward pass compute may run (more than 1: its paged KV pool)
    kv_tokens: int | None = None  # positions of the paged KV pool; None: max_context (a static cache at batch 1)
    ring_slots: int | None = None  # K for the starting policy; None: the policy's
    prefetch_depth: int | None = None  # D for the starting policy; None: the policy's
    verify_checksums: bool = True  # sha256 of every shard while reading it
    ready_file: Path | None = None  # where to write the ReadyFile once serving
    stats_on_exit: bool = False  # print the copy and wait statistics when the loader exits
    verbose: int = 0  # log level: 0 warnings, 1 info, 2 debug

    def argv(self) -> list[str]:
        """The command line that ``parse`` turns back into this record (the loader requires ``socket``)."""
        if self.socket is None:
            raise LaunchContractError("a loader command needs the socket address it is to listen on")
        args = ["--model", str(self.model), "--gpu-memory", str(self.gpu_memory), "--policy", self.policy]
        if self.device is not None:
            args += ["--device", self.device]
        args += ["--socket", self.socket, "--max-context", str(self.max_context)]
        if self.max_batch != 1:
            args += ["--max-batch", str(self.max_batch)]
        if self.kv_tokens is not None:
            args += ["--kv-tokens", str(self.kv_tokens)]
        if self.ring_slots is not None:
            args += ["--ring-slots", str(self.ring_slots)]
        if self.prefetch_depth is not None:
            args += ["--prefetch-depth", str(self.prefetch_depth)]
        if not self.verify_checksums:
            args.append("--no-verify-checksums")
        if self.ready_file is not None:
            args += ["--ready-file", str(self.ready_file)]
        if self.stats_on_exit:
            args.append("--stats-on-exit")
        if self.verbose:
            args.append("-" + "v" * self.verbose)
        return args

    @classmethod
    def parse(cls, argv: Sequence[str]) -> LoaderCommand:
        """The record a loader started with ``argv`` runs; ``LaunchContractError`` for a command line it refuses."""
        command = click.command()(loader_command_options(lambda **options: cls(**options)))
        try:
            with command.make_context("spillover loader", list(argv)) as ctx:
                return command.invoke(ctx)
        except click.ClickException as e:
            raise LaunchContractError(f"not a loader command line: {e.format_message()}") from None


# fmt: off
_OPTIONS = (
    click.option("--model", required=True, type=click.Path(file_okay=False, path_type=Path),
                 help="spillover-int4 model directory."),
    click.option("--gpu-memory", required=True, type=SIZE, help="Device memory of BOTH processes, e.g. 24GiB."),
    click.option("--policy", default=DEFAULT_POLICY, show_default=True, type=click.Choice(sorted(POLICY_NAMES)),
                 help="Residency policy."),
    click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None,
                 help="Where the pool lives (default: cuda when available)."),
    click.option("--socket", required=True, help="ipc:///DIR/NAME (DIR mode 0700) or tcp://127.0.0.1:PORT."),
    click.option("--max-context", default=DEFAULT_MAX_CONTEXT, show_default=True, type=click.IntRange(min=1),
                 help="Tokens the KV cache is counted for."),
    click.option("--max-batch", default=1, show_default=True, type=click.IntRange(min=1),
                 help="Sequences per forward pass compute may run (more than 1: a paged KV pool)."),
    click.option("--kv-tokens", type=click.IntRange(min=1), default=None,
                 help="Positions of the paged KV pool all sequences share (default: --max-context)."),
    click.option("--ring-slots", type=click.IntRange(min=1), default=None,
                 help="Ring slots K (default: the policy's)."),
    click.option("--prefetch-depth", type=click.IntRange(min=1), default=None,
                 help="Fill at most D units ahead (default: the policy's)."),
    click.option("--verify-checksums/--no-verify-checksums", default=True, show_default=True,
                 help="The sha256 of every shard (sizes are checked either way)."),
    click.option("--ready-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Written (JSON: address, pid) when ready."),
    click.option("--stats-on-exit", is_flag=True, help="Print copy and wait statistics when the loader exits."),
    click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug)."),
)
# fmt: on


def loader_command_options(function: Callable) -> Callable:
    """Add the loader's options to a click command; ``function`` receives them as ``LoaderCommand``'s fields."""
    for option in reversed(_OPTIONS):
        function = option(function)
    return function


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReadyFile:
    """What a loader writes once it serves: where to connect, and who it is."""

    address: str  # the ZeroMQ address it listens on (its --socket)
    pid: int  # the loader process's id

    def encode(self) -> str:
        return json.dumps({"address": self.address, "pid": self.pid})

    @classmethod
    def decode(cls, text: str) -> ReadyFile:
        try:
            fields = json.loads(text)
        except ValueError as e:
            raise LaunchContractError(f"a ready file must be JSON: {e}") from None
        if not isinstance(fields, dict) or set(fields) != {"address", "pid"}:
            raise LaunchContractError(f"a ready file holds exactly 'address' and 'pid', got {text[:200]!r}")
        if not isinstance(fields["address"], str) or type(fields["pid"]) is not int:
            raise LaunchContractError(f"a ready file's address is a string and its pid an integer, got {text[:200]!r}")
        return cls(address=fields["address"], pid=fields["pid"])

    def write(self, path: Path) -> None:
        """Write atomically: a reader sees no file or the whole file."""
        temporary = path.with_name(path.name + f".{os.getpid()}.tmp")
        temporary.write_text(self.encode())
        os.replace(temporary, path)

    @classmethod
    def read(cls, path: Path) -> ReadyFile:
        return cls.decode(path.read_text())
