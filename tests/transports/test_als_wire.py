"""The access log's own wire reader (native/als_wire.pyx, sidecar/_als_wire) reads every
entry as upb reads it: generated entries (odd texts, every kind of metadata value,
negative and huge times, flags), entries sent in pieces that protobuf merges, and mutated
bytes (where both read a message, both read the same; where ours gives up, upb decides:
sidecar/transports/als.py's read_entries)."""
from __future__ import annotations

from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import _als_wire, contract
from sidecar.transports.als import _flag_set, entry_fields, read_entries

NS = contract.USAGE_METADATA_NAMESPACE
texts = st.text(max_size=12)
values = st.one_of(texts.map(lambda t: ("s", t)), st.floats(allow_nan=False).map(lambda f: ("n", f)),
                   st.booleans().map(lambda b: ("b", b)), st.just(("null", None)))
durations = st.one_of(st.none(), st.tuples(st.integers(-10**6, 10**9), st.integers(-999_999_999, 999_999_999)))
flag_names = [f.name for f in accesslog_pb2.ResponseFlags.DESCRIPTOR.fields
              if f.type == f.TYPE_BOOL]


@st.composite
def entries(draw) -> accesslog_pb2.HTTPAccessLogEntry:
    e = accesslog_pb2.HTTPAccessLogEntry()
    for k, v in draw(st.dictionaries(texts, texts, max_size=4)).items():
        e.request.request_headers[k] = v
    e.request.request_id = draw(texts)
    e.request.request_body_bytes = draw(st.integers(0, 2**64 - 1))
    e.response.response_body_bytes = draw(st.integers(0, 2**64 - 1))
    if draw(st.booleans()):
        e.response.response_code.value = draw(st.integers(0, 2**32 - 1))
    cp = e.common_properties
    cp.route_name = draw(texts)
    for name in draw(st.lists(st.sampled_from(flag_names), max_size=3)):
        setattr(cp.response_flags, name, True)
    for field, d in zip(("time_to_first_upstream_tx_byte", "time_to_first_upstream_rx_byte",
                         "time_to_last_upstream_rx_byte"), draw(st.tuples(durations, durations, durations)), strict=True):
        if d is not None:
            getattr(cp, field).seconds, getattr(cp, field).nanos = d
    for ns in draw(st.lists(st.sampled_from([NS, "other", ""]), max_size=2, unique=True)):
        fields = cp.metadata.filter_metadata[ns].fields
        for k, (kind, v) in draw(st.dictionaries(st.sampled_from(["sse", "json", "request", "x"]), values, max_size=3)).items():
            if kind == "s":
                fields[k].string_value = v
            elif kind == "n":
                fields[k].number_value = v
            elif kind == "b":
                fields[k].bool_value = v
            else:
                fields[k].null_value = 0
    return e


def normalised(rows):
    # the flags' bytes differ (ours: as sent; upb: re-encoded): their meaning must not
    return [row[:3] + (_flag_set(row[3]),) + row[4:] for row in rows]


def upb_read(data: bytes):
    return [entry_fields(e) for e in als_pb2.StreamAccessLogsMessage.FromString(data).http_logs.log_entry]


def message(*parts: bytes) -> bytes:
    """A StreamAccessLogsMessage whose http_logs holds one log_entry per part (raw bytes)."""
    inner = b"".join(b"\x0a" + _varint(len(p)) + p for p in parts)
    return b"\x12" + _varint(len(inner)) + inner


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


@settings(max_examples=300, deadline=None)
@given(st.lists(entries(), max_size=4))
def test_generated_entries_read_as_upb_reads_them(batch):
    msg = als_pb2.StreamAccessLogsMessage()
    msg.identifier.log_name = "kt_usage"
    msg.http_logs.log_entry.extend(batch)
    data = msg.SerializeToString()
    assert normalised(_als_wire.read_message(data, NS)) == normalised(upb_read(data))


@settings(max_examples=200, deadline=None)
@given(entries(), entries())
def test_an_entry_sent_in_two_pieces_is_merged_as_protobuf_merges_it(a, b):
    # two serialized entries one after the other in one log_entry: protobuf merges them
    # (last scalars win, maps add up, a Duration's seconds and nanos each keep their last)
    data = message(a.SerializeToString() + b.SerializeToString())
    assert normalised(_als_wire.read_message(data, NS)) == normalised(upb_read(data))


@settings(max_examples=400, deadline=None)
@given(entries(), st.data())
def test_mutated_bytes_are_read_as_upb_reads_them_or_left_to_upb(entry, data):
    raw = bytearray(message(entry.SerializeToString()))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = bytes(raw[:data.draw(st.integers(0, len(raw)))])
    try:
        ours = _als_wire.read_message(cut, NS)
    except ValueError:
        ours = None  # read_entries asks upb
    try:
        theirs = upb_read(cut)
    except DecodeError:
        theirs = None
    if ours is not None and theirs is not None:
        assert normalised(ours) == normalised(theirs)
    if theirs is not None:  # what read_entries gives is upb's reading whenever upb has one
        assert normalised(read_entries(cut)) == normalised(theirs)
