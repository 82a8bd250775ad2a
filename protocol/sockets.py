"""ZeroMQ sockets between the loader and compute, named by direction, private by construction.

Addresses are either ``ipc://PATH`` with PATH inside a directory only this user can open (mode 0700, owned by
us; ``make_run_dir`` makes one), or ``tcp://127.0.0.1:PORT``. Anything else — a wildcard or external
interface, another transport, a world-readable directory — is refused by ``check_address`` before any
socket exists. The loader binds a ROUTER (``LoaderSocket``), compute connects a DEALER (``ComputeSocket``):
unlike REQ/REP there is no lockstep to wedge when a peer dies mid-exchange. Every receive takes a timeout.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import tempfile
from pathlib import Path

import zmq

from protocol.codec import MAX_MESSAGE_BYTES, ProtocolError, decode, encode
from protocol.messages import Message

# zmq drops a connection that sends more than this; between MAX_MESSAGE_BYTES and this the loader answers
# an Error instead, so a too-large request gets a reason, and memory stays bounded either way.
ZMQ_MAX_MESSAGE_BYTES = 4 * MAX_MESSAGE_BYTES

_TCP = re.compile(r"tcp://127\.0\.0\.1:(\d{1,5})")


class AddressError(ValueError):
    """A socket address that is not private to this user; the message says why and what to use."""


def make_run_dir(prefix: str = "spillover-", needed_bytes: int = 0) -> Path:
    """A new directory only this user can open (mode 0700), in /dev/shm (memory, not disk) when it has room.

    ``needed_bytes`` is what will be written there (the CPU pool): a container's /dev/shm is often only
    64 MiB, and writing past a full tmpfs through a mapping kills the writer with SIGBUS, so a /dev/shm
    with less free space than that (plus a margin) is passed over for the system's temporary directory.
    """
    base = None
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        info = os.statvfs("/dev/shm")
        if info.f_bavail * info.f_frsize >= needed_bytes + (16 << 20):
            base = "/dev/shm"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))  # mkdtemp creates it with mode 0700


def check_private_dir(directory: Path) -> None:
    """Raise ``AddressError`` unless ``directory`` exists, is ours and is closed to group and others."""
    try:
        info = directory.stat()
    except FileNotFoundError:
        raise AddressError(f"directory {directory} does not exist; create it with mode 0700 first") from None
    if not stat.S_ISDIR(info.st_mode):
        raise AddressError(f"{directory} is not a directory")
    if info.st_uid != os.getuid():
        raise AddressError(f"directory {directory} belongs to uid {info.st_uid}, not to this user ({os.getuid()})")
    if info.st_mode & 0o077:
        raise AddressError(
            f"directory {directory} has mode {stat.S_IMODE(info.st_mode):o}: other users could reach the socket; "
            f"use a directory with mode 700 (chmod 700 {directory})"
        )


def check_address(address: str) -> str:
    """``address`` if it is a private ipc:// path or a 127.0.0.1 tcp port, else ``AddressError``."""
    if address.startswith("ipc://"):
        path = Path(address[len("ipc://") :])
        if not path.is_absolute():
            raise AddressError(f"{address}: the ipc path must be absolute")
        check_private_dir(path.parent)
        return address
    match = _TCP.fullmatch(address)
    if match and 1 <= int(match.group(1)) <= 65535:
        return address
    raise AddressError(
        f"{address!r} is not allowed: use ipc:///DIR/NAME with DIR a mode-0700 directory, "
        "or tcp://127.0.0.1:PORT (never a wildcard or an external interface)"
    )


def _socket(context: zmq.Context, kind: int) -> zmq.Socket:
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)  # closing never blocks on unsent messages to a dead peer
    sock.setsockopt(zmq.MAXMSGSIZE, ZMQ_MAX_MESSAGE_BYTES)
    return sock


@dataclasses.dataclass(frozen=True)
class Received:
    """One request as the loader got it: the peer to answer, and the message or why it could not be read."""

    peer: bytes  # ROUTER identity of the sender
    message: Message | None  # None when ``error`` is set
    error: ProtocolError | None


class LoaderSocket:
    """The loader's end: a ROUTER bound to a private address, serving one request at a time."""

    def __init__(self, address: str):
        self.address = check_address(address)
        self._context = zmq.Context()
        self._sock = _socket(self._context, zmq.ROUTER)
        self._sock.bind(self.address)

    def recv_from_compute(self, timeout_s: float) -> Received | None:
        """The next request, or None when none arrived within ``timeout_s``; never raises for bad input."""
        if not self._sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            return None
        frames = self._sock.recv_multipart(copy=True)
        peer, payload = frames[0], frames[1:]
        if len(payload) != 1:
            error = ProtocolError(f"expected one frame per message, got {len(payload)}")
            return Received(peer=peer, message=None, error=error)
        try:
            return Received(peer=peer, message=decode(payload[0]), error=None)
        except ProtocolError as e:
            return Received(peer=peer, message=None, error=e)

    def send_to_compute(self, peer: bytes, message: Message) -> None:
        # a vanished peer's reply is dropped by the ROUTER rather than blocking the loader
        self._sock.send_multipart([peer, encode(message)], flags=zmq.NOBLOCK)

    def close(self) -> None:
        self._sock.close()
        self._context.term()
        if self.address.startswith("ipc://"):
            Path(self.address[len("ipc://") :]).unlink(missing_ok=True)


class ComputeSocket:
    """Compute's end: a DEALER connected to the loader."""

    def __init__(self, address: str):
        self.address = check_address(address)
        self._context = zmq.Context()
        self._sock = _socket(self._context, zmq.DEALER)
        self._sock.connect(self.address)

    def send_to_loader(self, message: Message) -> None:
        self._sock.send(encode(message))

    def recv_from_loader(self, timeout_s: float) -> Message | None:
        """The loader's next message, or None when none arrived within ``timeout_s``."""
        if not self._sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            return None
        return decode(self._sock.recv())

    def close(self) -> None:
        self._sock.close()
        self._context.term()
