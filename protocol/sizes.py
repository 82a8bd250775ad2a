"""Sizes in bytes as people write them (``--gpu-memory 24GiB``) and read them (``1.25 GiB``).

A size crosses the process boundary as text on the loader's command line (``protocol.launch``); both sides parse
it with ``parse_size`` and print it with ``format_size``.
"""

from __future__ import annotations

import re

import click

GiB = 1 << 30
MiB = 1 << 20

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}  # fmt: skip
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"24GiB"`` -> bytes. KiB/MiB/GiB/TiB and the bare K/M/G/T are binary (``8G`` = 8 GiB, as GPU memory is
    quoted); KB/MB/GB/TB are decimal (``1.5GB`` = 1.5e9); a bare number is bytes. Case-insensitive; fractions
    allowed; the result is rounded down to whole bytes and must be positive."""
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(
            f"{text!r} is not a size: write a number and a unit, e.g. 24GiB, 512MiB, 1.5GB or 8G "
            "(K/M/G/T and KiB/MiB/GiB/TiB are powers of 1024, KB/MB/GB/TB powers of 1000)"
        )
    nbytes = int(float(match.group(1)) * _UNITS[unit])
    if nbytes <= 0:
        raise ValueError(f"{text!r} is not a usable size: it must be more than 0 bytes")
    return nbytes


class SizeType(click.ParamType):
    """A click parameter type for sizes such as ``--gpu-memory 24GiB``."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


SIZE = SizeType()


def format_size(nbytes: int) -> str:
    """Bytes for people: ``1.25 GiB``, ``300.0 MiB``, ``12.0 KiB``, ``17 B``."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{nbytes} B"
