"""Red team, round 2: the access log's wire reader against upb on messages Envoy would not
write but protobuf reads (a google.protobuf.Value whose kind's field number comes again
under another wire type: an unknown field to protobuf, which leaves the kind as it was)."""
from __future__ import annotations

import pytest

from sidecar import _als_wire, contract
from sidecar.transports.als import read_entries
from tests.transports.test_als_wire import _varint, message, normalised, upb_read

NS = contract.USAGE_METADATA_NAMESPACE


def _ld(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _entry_with_usage_value(value: bytes) -> bytes:
    struct = _ld(1, _ld(1, b"json") + _ld(2, value))  # Struct.fields: {"json": value}
    metadata = _ld(1, _ld(1, NS.encode()) + _ld(2, struct))  # filter_metadata: {NS: struct}
    return message(_ld(1, _ld(17, metadata)))  # common_properties.metadata


@pytest.mark.parametrize("unknown", [
    b"\x10\x01",  # number_value's field number as a varint (a double is fixed64)
    b"\x0a\x00",  # null_value's as a length-delimited field (an enum is a varint)
    b"\x12\x00",  # number_value's as length-delimited
    b"\x28\x00",  # struct_value's as a varint
])
def test_a_value_keeps_its_string_past_an_unknown_field_as_upb_reads_it(unknown):
    # finding 1 (fixed): our reader took any field 1, 2, 4, 5 or 6 as another kind and
    # read the usage text as "" (the entry settled at its estimate) where upb kept it
    usage_text = b'{"usage": {"prompt_tokens": 90000, "completion_tokens": 9000}}'
    data = _entry_with_usage_value(_ld(3, usage_text) + unknown)
    ours = _als_wire.read_message(data, NS)
    assert ours[0][4] == {"json": usage_text.decode()}
    assert normalised(ours) == normalised(upb_read(data))


@pytest.mark.parametrize("where", ["usage", "header"])
def test_a_map_entry_with_an_unknown_field_is_read_as_upb_reads_it(where):
    # finding 5 (fixed): upb moves such an entry to the parent's unknown fields (the map
    # does not hold it); our reader kept it: a usage text upb never saw was settled
    odd = _ld(12, b"x")  # a field a map entry does not have
    if where == "usage":
        usage_text = b'{"usage": {"prompt_tokens": 90000, "completion_tokens": 9000}}'
        struct = _ld(1, odd + _ld(1, b"json") + _ld(2, _ld(3, usage_text)))
        metadata = _ld(1, _ld(1, NS.encode()) + _ld(2, struct))
        data = message(_ld(1, _ld(17, metadata)))
    else:
        data = message(_ld(3, _ld(13, odd + _ld(1, b"x-kt-reservation") + _ld(2, b"r1"))))
    theirs = upb_read(data)
    assert normalised(read_entries(data)) == normalised(theirs)
    assert theirs[0][4] in (None, {}) and theirs[0][0] == {}  # upb: no such entry
