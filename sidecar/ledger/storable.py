"""Every value made storable before it reaches a sink.

Text in an event comes from clients and upstreams (model names, request ids): it may
hold NUL (PostgreSQL's text refuses it), lone surrogates (what invalid UTF-8 becomes
when decoded leniently; no UTF-8 encoder takes them) or be megabytes long. One
hostile value must never make a batch unwritable, so the writer stores each text
value through ``storable_text``, a documented escape that is the identity for every
ordinary value and can be undone (``original_text``) for every value it escapes:

- a value with no backslash, NUL or lone surrogate, at most ``TEXT_MAX`` characters
  long, is stored as it is;
- otherwise ``\\`` becomes ``\\\\``, NUL ``\\x00``, a lone surrogate ``\\udXXX`` (so
  an invalid UTF-8 byte 0xff, decoded with surrogateescape, reads ``\\udcff``);
- an escaped value still longer than ``TEXT_MAX`` keeps its first characters (never
  cut inside an escape) followed by ``\\~`` and the SHA-256 (hex) of the whole
  original (UTF-8, surrogates passed through): equal originals give equal values.

So a stored value holds a backslash exactly when it was escaped, and two different
originals never share a stored value (the primary key (tenant, request id, outcome)
cannot fold two requests into one row). Integers a sink's 64-bit columns cannot hold
make the event ``Unstorable``: it goes to the dead-letter file with that reason.
"""
from __future__ import annotations

import hashlib
import operator
import re
import typing
from typing import Callable, Optional

import msgspec

from sidecar.ledger.events import Event

TEXT_MAX = 512  # characters of one stored text value
INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1  # PostgreSQL bigint
_NEEDS_ESCAPE = re.compile("[\\\\\x00\ud800-\udfff]")
_ESCAPES = {"\\": "\\\\", "\x00": "\\x00"}
_HASH_MARK = "\\~"
_PREFIX_MAX = TEXT_MAX - len(_HASH_MARK) - 64  # room left for the mark and the hash
_UNESCAPE = re.compile(r"\\(\\|x00|ud[89a-f][0-9a-f]{2})")


def _escape_char(c: str) -> str:
    esc = _ESCAPES.get(c)
    if esc is not None:
        return esc
    if "\ud800" <= c <= "\udfff":
        return f"\\u{ord(c):04x}"
    return c


def _needs_escape(s: str) -> bool:
    # substring tests run in C: most values are ASCII, and then hold no surrogate
    return "\\" in s or "\x00" in s or (not s.isascii() and _NEEDS_ESCAPE.search(s) is not None)


def storable_text(s: str) -> str:
    """The stored form of one text value (see the module's docstring)."""
    if len(s) <= TEXT_MAX and not _needs_escape(s):
        return s
    escaped = _NEEDS_ESCAPE.sub(lambda m: _escape_char(m.group()), s)
    if len(escaped) <= TEXT_MAX:
        return escaped
    prefix: list[str] = []
    size = 0
    for c in s:
        e = _escape_char(c)
        if size + len(e) > _PREFIX_MAX:
            break
        prefix.append(e)
        size += len(e)
    digest = hashlib.sha256(s.encode("utf-8", "surrogatepass")).hexdigest()
    return "".join(prefix) + _HASH_MARK + digest


def original_text(stored: str) -> Optional[str]:
    """The original of a stored value, or None when only its prefix and hash were kept."""
    if _HASH_MARK in stored.replace("\\\\", ""):
        return None
    return _UNESCAPE.sub(lambda m: {"\\": "\\", "x00": "\x00"}.get(m.group(1))
                         or chr(int(m.group(1)[1:], 16)), stored)


def _fields_of(cls: type) -> tuple[tuple[str, ...], Callable, tuple[str, ...], Callable]:
    """The names of an event type's text and integer fields, and a getter of each kind's
    values as one tuple (every event type has at least two of each)."""
    fields = msgspec.structs.fields(cls)
    texts = tuple(f.name for f in fields if f.type is str)
    ints = tuple(f.name for f in fields if f.type is int)
    return texts, operator.attrgetter(*texts), ints, operator.attrgetter(*ints)


_FIELDS = {cls: _fields_of(cls) for cls in typing.get_args(Event)}


class Unstorable(ValueError):
    """No sink can store this event (the message says which value); ``event`` is it with
    its text made storable, for the dead-letter file."""

    def __init__(self, message: str, event: Event) -> None:
        super().__init__(message)
        self.event = event


def storable(event: Event) -> Event:
    """The event as a sink can store it: every text value through ``storable_text``
    (the same object when none needs it: the common case costs one join and three
    substring tests). Raises Unstorable for an integer outside the 64-bit range."""
    texts, text_values, ints, int_values = _FIELDS[type(event)]
    values = text_values(event)
    joined = "".join(values)
    if (len(joined) > TEXT_MAX and max(map(len, values)) > TEXT_MAX) or _needs_escape(joined):
        event = msgspec.structs.replace(event, **{
            name: storable_text(v) for name, v in zip(texts, values, strict=True)})
    tags = getattr(event, "tags", ())  # a usage event's list of text (sidecar/attribution.py)
    if tags and any(len(t) > TEXT_MAX or _needs_escape(t) for t in tags):
        event = msgspec.structs.replace(event, tags=tuple(map(storable_text, tags)))
    numbers = int_values(event)
    if min(numbers) < INT_MIN or max(numbers) > INT_MAX:
        name, v = next((n, v) for n, v in zip(ints, numbers, strict=True)
                       if not INT_MIN <= v <= INT_MAX)
        raise Unstorable(f"{name} = {v} is outside the 64-bit integer range", event)
    return event
