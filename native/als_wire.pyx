# cython: language_level=3, boundscheck=False, wraparound=False
"""Envoy's access-log messages read straight off the wire: the fields the usage receiver
reads (sidecar/transports/als.py), one tuple per entry, without building upb's Python
wrapper per field read (measured 11.2 -> 2.7 µs per entry: docs/bench.md, issue 26).

Protobuf's own rules are kept where Envoy's messages can meet them: a field repeated is
merged (a scalar's last value wins, map entries add up, a sub-message read twice merges:
a Duration's seconds and nanos each keep their last value); a google.protobuf.Value counts
as a string only when its last kind is string_value. Anything else (a wire type out of
place, a group, a length past the end, a varint too long, text that is not UTF-8) raises
ValueError, and the caller reads the message with upb instead (sidecar/transports/als.py).
Fields it does not read are skipped by their length, not parsed: a message malformed
only inside them is read here where upb would refuse it whole. Only Envoy writes to the
access-log service (the gRPC port's token, docs/security.md), and a peer that could would
send well-formed entries anyway.

read_message(data, namespace) -> [(headers, request_id, status, flags, usage, tx_us,
first_rx_us, last_rx_us, route_name, request_body_bytes, response_body_bytes)]:
headers a dict of the request headers logged; flags the concatenated bytes of the
response_flags sub-message (b"": none set; parse them with upb's ResponseFlags);
usage the string values of the metadata namespace's Struct (None: no such namespace).
"""
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t


class WireError(ValueError):
    pass


cdef inline uint64_t _varint(const unsigned char* b, Py_ssize_t end, Py_ssize_t* pos) except? 0xFFFFFFFFFFFFFFFF:
    cdef uint64_t v = 0
    cdef int shift = 0
    cdef unsigned char c
    while True:
        if pos[0] >= end or shift > 63:
            raise WireError("truncated or overlong varint")
        c = b[pos[0]]
        pos[0] += 1
        v |= (<uint64_t>(c & 0x7F)) << shift
        if c < 0x80:
            return v
        shift += 7


cdef inline Py_ssize_t _len(const unsigned char* b, Py_ssize_t end, Py_ssize_t* pos) except -1:
    cdef uint64_t ln = _varint(b, end, pos)
    if ln > <uint64_t>(end - pos[0]):
        raise WireError("length past the end")
    return <Py_ssize_t>ln


cdef inline int _skip(const unsigned char* b, Py_ssize_t end, Py_ssize_t* pos, uint64_t key) except -1:
    cdef int wt = key & 7
    if (key >> 3) == 0:
        raise WireError("field number 0")
    if wt == 0:
        _varint(b, end, pos)
    elif wt == 1:
        pos[0] += 8
    elif wt == 2:
        pos[0] += _len(b, end, pos)
    elif wt == 5:
        pos[0] += 4
    else:
        raise WireError("group or unknown wire type")
    if pos[0] > end:
        raise WireError("truncated")
    return 0


cdef inline str _text(const unsigned char* b, Py_ssize_t start, Py_ssize_t ln):
    return (b[start:start + ln]).decode("utf-8")  # UnicodeDecodeError is a ValueError


cdef class _Duration:
    """A google.protobuf.Duration merged over its occurrences: seconds and nanos each last."""
    cdef int64_t seconds
    cdef int64_t nanos

    cdef int read(self, const unsigned char* b, Py_ssize_t start, Py_ssize_t end) except -1:
        cdef Py_ssize_t pos = start
        cdef uint64_t key, raw
        cdef uint32_t low
        while pos < end:
            key = _varint(b, end, &pos)
            if key == 8:
                raw = _varint(b, end, &pos)
                self.seconds = <int64_t>raw
            elif key == 16:  # an int32: the varint's low 32 bits, signed
                raw = _varint(b, end, &pos)
                low = <uint32_t>(raw & 0xFFFFFFFF)
                self.nanos = <int64_t>(<int32_t>low)
            else:
                _skip(b, end, &pos, key)
        return 0

    cdef object micros(self):
        # as sidecar/upstream_sli.py's duration_us: Python's floor division
        return self.seconds * 1000000 + (<object>self.nanos) // 1000


cdef tuple _map_entry(const unsigned char* b, Py_ssize_t start, Py_ssize_t end):
    """A map entry: (its string key, the start and length of its value's bytes, whether the
    value was there). Its parts repeated: the last of each. Any other field: WireError."""
    cdef Py_ssize_t pos = start, ln, vs = 0, vl = 0
    cdef uint64_t key
    cdef str k = ""
    cdef bint present = False
    while pos < end:
        key = _varint(b, end, &pos)
        if key == 10:
            ln = _len(b, end, &pos)
            k = _text(b, pos, ln)
            pos += ln
        elif key == 18:
            ln = _len(b, end, &pos)
            vs, vl, present = pos, ln, True
            pos += ln
        else:
            # upb moves an entry with any other field into its parent's unknown fields:
            # the map does not hold it; upb reads such a message (read_entries)
            raise WireError("a map entry with a field other than its key and value")
    return k, vs, vl, present


cdef str _value_string(const unsigned char* b, Py_ssize_t start, Py_ssize_t end):
    """google.protobuf.Value: its string_value, "" when its last kind is another."""
    cdef Py_ssize_t pos = start, ln
    cdef uint64_t key
    cdef str text = ""
    while pos < end:
        key = _varint(b, end, &pos)
        if key == 26:
            ln = _len(b, end, &pos)
            text = _text(b, pos, ln)
            pos += ln
        elif key in (8, 17, 32, 42, 50):  # null, number, bool, struct, list: each by its own
            # wire type; the same field numbers under another are unknown fields to protobuf,
            # which leave the kind as it was (a string_value stays)
            _skip(b, end, &pos, key)
            text = ""
        else:
            _skip(b, end, &pos, key)
    return text


cdef int _struct_strings(const unsigned char* b, Py_ssize_t start, Py_ssize_t end,
                         dict out) except -1:
    """google.protobuf.Struct's fields (1: map<string, Value>) into ``out``."""
    cdef Py_ssize_t pos = start, ln
    cdef uint64_t key
    while pos < end:
        key = _varint(b, end, &pos)
        if key == 10:
            ln = _len(b, end, &pos)
            name, vs, vl, present = _map_entry(b, pos, pos + ln)
            out[name] = _value_string(b, vs, vs + vl) if present else ""
            pos += ln
        else:
            _skip(b, end, &pos, key)
    return 0


cdef tuple _entry(const unsigned char* b, Py_ssize_t start, Py_ssize_t end, str namespace):
    cdef Py_ssize_t pos = start, ln, p, e, p2, e2, ln2
    cdef uint64_t key, k2, k3
    cdef dict headers = {}
    cdef object usage = None
    cdef list flags = []
    cdef str request_id = "", route = ""
    cdef uint64_t status = 0, req_bytes = 0, resp_bytes = 0
    cdef _Duration tx = _Duration(), first = _Duration(), last = _Duration()
    while pos < end:
        key = _varint(b, end, &pos)
        if key == 10:  # common_properties (AccessLogCommon)
            ln = _len(b, end, &pos)
            p, e = pos, pos + ln
            pos = e
            while p < e:
                k2 = _varint(b, e, &p)
                if (k2 & 7) != 2 or (k2 >> 3) not in (7, 9, 10, 16, 17, 19):
                    _skip(b, e, &p, k2)
                    continue
                ln2 = _len(b, e, &p)
                if k2 == (7 << 3 | 2):
                    tx.read(b, p, p + ln2)
                elif k2 == (9 << 3 | 2):
                    first.read(b, p, p + ln2)
                elif k2 == (10 << 3 | 2):
                    last.read(b, p, p + ln2)
                elif k2 == (19 << 3 | 2):
                    route = _text(b, p, ln2)
                elif k2 == (16 << 3 | 2):
                    flags.append(b[p:p + ln2])
                else:  # 17: metadata; filter_metadata = 1, map<string, Struct>
                    p2, e2 = p, p + ln2
                    while p2 < e2:
                        k3 = _varint(b, e2, &p2)
                        if k3 == 10:
                            ln = _len(b, e2, &p2)
                            name, vs, vl, present = _map_entry(b, p2, p2 + ln)
                            if name == namespace:
                                # a map key repeated: its last entry replaces the earlier
                                usage = {}
                                _struct_strings(b, vs, vs + vl, usage)
                            p2 += ln
                        else:
                            _skip(b, e2, &p2, k3)
                p += ln2
        elif key == 26:  # request (HTTPRequestProperties)
            ln = _len(b, end, &pos)
            p, e = pos, pos + ln
            pos = e
            while p < e:
                k2 = _varint(b, e, &p)
                if k2 == (13 << 3 | 2):  # request_headers, map<string, string>
                    ln2 = _len(b, e, &p)
                    name, vs, vl, present = _map_entry(b, p, p + ln2)
                    headers[name] = _text(b, vs, vl)
                    p += ln2
                elif k2 == (9 << 3 | 2):
                    ln2 = _len(b, e, &p)
                    request_id = _text(b, p, ln2)
                    p += ln2
                elif k2 == (12 << 3 | 0):
                    req_bytes = _varint(b, e, &p)
                else:
                    _skip(b, e, &p, k2)
        elif key == 34:  # response (HTTPResponseProperties)
            ln = _len(b, end, &pos)
            p, e = pos, pos + ln
            pos = e
            while p < e:
                k2 = _varint(b, e, &p)
                if k2 == 10:  # response_code, UInt32Value (value = 1)
                    ln2 = _len(b, e, &p)
                    p2, e2 = p, p + ln2
                    while p2 < e2:
                        k3 = _varint(b, e2, &p2)
                        if k3 == 8:  # a uint32: the varint's low 32 bits
                            status = _varint(b, e2, &p2) & <uint64_t>0xFFFFFFFF
                        else:
                            _skip(b, e2, &p2, k3)
                    p += ln2
                elif k2 == (3 << 3 | 0):
                    resp_bytes = _varint(b, e, &p)
                else:
                    _skip(b, e, &p, k2)
        else:
            _skip(b, end, &pos, key)
    return (headers, request_id, status, b"".join(flags), usage, tx.micros(), first.micros(),
            last.micros(), route, req_bytes, resp_bytes)


def read_message(bytes data, str namespace):
    """The entries of a StreamAccessLogsMessage (its http_logs = 2, log_entry = 1)."""
    cdef const unsigned char* b = data
    cdef Py_ssize_t n = len(data), pos = 0, ln, p, e, ln2
    cdef uint64_t key, k2
    cdef list out = []
    while pos < n:
        key = _varint(b, n, &pos)
        if key == 18:
            ln = _len(b, n, &pos)
            p, e = pos, pos + ln
            pos = e
            while p < e:
                k2 = _varint(b, e, &p)
                if k2 == 10:
                    ln2 = _len(b, e, &p)
                    out.append(_entry(b, p, p + ln2, namespace))
                    p += ln2
                else:
                    _skip(b, e, &p, k2)
        else:
            _skip(b, n, &pos, key)
    return out
