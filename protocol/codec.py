"""The one encode/decode path for messages: msgpack maps, checked field by field against the dataclasses.

Wire form: a msgpack map ``{"type": TAG, field: value, ...}`` with the fields in declaration order; nested
records are maps of their fields; tuples are arrays; ``bytes`` are msgpack bin. ``decode`` accepts exactly
what ``encode`` produces: anything else — garbage bytes, a non-map, an unknown tag, a missing or unknown
field, a value of the wrong type, an extension type, a message over ``MAX_MESSAGE_BYTES`` — raises
``ProtocolError`` naming what was wrong. No pickle, ever: decoding can only build the registered classes.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing

import msgpack

from protocol.messages import MESSAGE_TYPES, Message

# A Plan for a 100-layer model is about 150 KB; anything near this limit is a bug or an attack.
MAX_MESSAGE_BYTES = 4 << 20


class ProtocolError(ValueError):
    """Bytes that are not a valid message; the message says what was wrong."""


def encode(message: Message) -> bytes:
    """A registered message -> its msgpack bytes."""
    tag = getattr(type(message), "TYPE", None)
    if MESSAGE_TYPES.get(tag) is not type(message):
        raise ProtocolError(f"{type(message).__name__} is not a registered message type")
    body = {"type": tag, **_to_plain(message)}
    data = msgpack.packb(body, use_bin_type=True)
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"{tag} message is {len(data)} bytes, over the {MAX_MESSAGE_BYTES}-byte limit")
    return data


def decode(data: bytes) -> Message:
    """msgpack bytes -> the registered message they encode; ``ProtocolError`` for anything else."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message is {len(data)} bytes, over the {MAX_MESSAGE_BYTES}-byte limit")
    try:
        body = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True, ext_hook=_refuse_ext)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises several unrelated types for malformed input
        raise ProtocolError(f"not a msgpack message ({len(data)} bytes): {type(e).__name__}: {e}") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"a message must be a msgpack map, got {type(body).__name__}")
    tag = body.pop("type", None)
    if not isinstance(tag, str):
        raise ProtocolError(f"message has no str 'type' field (got {tag!r})")
    cls = MESSAGE_TYPES.get(tag)
    if cls is None:
        raise ProtocolError(f"unknown message type {tag!r}; known types: {', '.join(sorted(MESSAGE_TYPES))}")
    return _from_plain(cls, body, tag)


def _refuse_ext(code: int, data: bytes) -> None:
    raise ProtocolError(f"msgpack extension type {code} is not allowed in a message")


def _to_plain(record) -> dict:
    out = {}
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        out[field.name] = _plain_value(value)
    return out


def _plain_value(value):
    if dataclasses.is_dataclass(value):
        return _to_plain(value)
    if isinstance(value, tuple):
        return [_plain_value(v) for v in value]
    return value


@functools.cache
def _field_types(cls: type) -> dict[str, object]:
    """Field name -> resolved annotation, for the dataclass ``cls`` (annotations are strings here)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _from_plain(cls: type, body, where: str):
    if not isinstance(body, dict):
        raise ProtocolError(f"{where}: expected a map of {cls.__name__} fields, got {type(body).__name__}")
    fields = _field_types(cls)
    missing = [name for name in fields if name not in body]
    if missing:
        raise ProtocolError(f"{where}: missing field(s) {', '.join(missing)}")
    unknown = [str(name) for name in body if name not in fields]
    if unknown:
        raise ProtocolError(f"{where}: unknown field(s) {', '.join(unknown)}")
    values = {name: _check(kind, body[name], f"{where}.{name}") for name, kind in fields.items()}
    return cls(**values)


def _check(kind, value, where: str):
    """``value`` as the annotation ``kind`` wants it, or ``ProtocolError`` naming ``where``."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        (inner,) = [k for k in options if k is not type(None)]  # only "X | None" is used in messages
        return _check(inner, value, where)
    if origin is tuple:
        item_kind, ellipsis = typing.get_args(kind)
        assert ellipsis is Ellipsis, f"messages use tuple[X, ...] only, not {kind}"
        if not isinstance(value, list):
            raise ProtocolError(f"{where}: expected an array, got {_describe(value)}")
        return tuple(_check(item_kind, v, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(kind):
        return _from_plain(kind, value, where)
    if kind is float:
        # msgpack keeps 2.0 a float, but a peer in another language may write whole numbers as ints
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind in (str, bytes, bool):
        if type(value) is kind:
            return value
    else:
        raise AssertionError(f"messages may not use fields of type {kind}")
    raise ProtocolError(f"{where}: expected {kind.__name__}, got {_describe(value)}")


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '…' if len(text) > 40 else text}"
