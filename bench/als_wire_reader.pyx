# cython: language_level=3, boundscheck=False, wraparound=False
# A prototype, for bench/micro_als_decode.py only (not the product): the fields the
# access-log receiver reads (sidecar/transports/als.py, sidecar/upstream_sli.py), read
# straight off a StreamAccessLogsMessage's wire bytes into one tuple per entry, to measure
# what a reader of our own would buy against upb (docs/bench.md, issue 26). Not done for
# production: the response flags' individual bits (it only says whether any is set), a
# Value whose oneof switches away from string_value, UTF-8 errors mapped to upb's refusal
# of the whole message, and a fuzz test against upb.
from libc.stdint cimport uint64_t, int64_t

class WireError(ValueError):
    pass

cdef inline uint64_t _varint(const unsigned char* b, Py_ssize_t n, Py_ssize_t* pos) except? 0xFFFFFFFFFFFFFFFF:
    cdef uint64_t v = 0
    cdef int shift = 0
    cdef unsigned char c
    while True:
        if pos[0] >= n or shift > 63:
            raise WireError("truncated varint")
        c = b[pos[0]]
        pos[0] += 1
        v |= (<uint64_t>(c & 0x7F)) << shift
        if c < 0x80:
            return v
        shift += 7

cdef inline int _skip(const unsigned char* b, Py_ssize_t n, Py_ssize_t* pos, int wt) except -1:
    cdef uint64_t ln
    if wt == 0:
        _varint(b, n, pos)
    elif wt == 1:
        pos[0] += 8
    elif wt == 2:
        ln = _varint(b, n, pos)
        pos[0] += <Py_ssize_t>ln
    elif wt == 5:
        pos[0] += 4
    else:
        raise WireError("bad wire type")
    if pos[0] > n:
        raise WireError("truncated")
    return 0

cdef inline Py_ssize_t _len(const unsigned char* b, Py_ssize_t n, Py_ssize_t* pos) except -1:
    cdef uint64_t ln = _varint(b, n, pos)
    if ln > <uint64_t>(n - pos[0]):
        raise WireError("length past the end")
    return <Py_ssize_t>ln

cdef int64_t _duration_us(const unsigned char* b, Py_ssize_t start, Py_ssize_t end) except? -1:
    cdef Py_ssize_t pos = start
    cdef uint64_t key
    cdef int64_t s = 0, ns = 0
    while pos < end:
        key = _varint(b, end, &pos)
        if key == 8:
            s = <int64_t>_varint(b, end, &pos)
        elif key == 16:
            ns = <int64_t>_varint(b, end, &pos)
        else:
            _skip(b, end, &pos, key & 7)
    return s * 1000000 + (<int>ns) // 1000

cdef str _str(const unsigned char* b, Py_ssize_t start, Py_ssize_t ln):
    return (<bytes>b[start:start + ln]).decode("utf-8")

cdef _map_entry(const unsigned char* b, Py_ssize_t start, Py_ssize_t end):
    # key = 1 (string), value = 2 (bytes): the raw value's span
    cdef Py_ssize_t pos = start, ln
    cdef uint64_t key
    cdef object k = "", vstart = None
    cdef Py_ssize_t vs = 0, vl = 0
    while pos < end:
        key = _varint(b, end, &pos)
        if key == 10:
            ln = _len(b, end, &pos); k = _str(b, pos, ln); pos += ln
        elif key == 18:
            ln = _len(b, end, &pos); vs = pos; vl = ln; pos += ln
        else:
            _skip(b, end, &pos, key & 7)
    return k, vs, vl

cdef dict _struct_strings(const unsigned char* b, Py_ssize_t start, Py_ssize_t end):
    # google.protobuf.Struct: fields = 1 (map<string, Value>); Value.string_value = 3
    cdef Py_ssize_t pos = start, ln, vs, vl, p2, e2
    cdef uint64_t key, k2
    cdef dict out = {}
    while pos < end:
        key = _varint(b, end, &pos)
        if key == 10:
            ln = _len(b, end, &pos)
            name, vs, vl = _map_entry(b, pos, pos + ln)
            pos += ln
            p2 = vs; e2 = vs + vl; val = ""
            while p2 < e2:
                k2 = _varint(b, e2, &p2)
                if k2 == 26:
                    ln = _len(b, e2, &p2); val = _str(b, p2, ln); p2 += ln
                else:
                    _skip(b, e2, &p2, k2 & 7)
            out[name] = val
        else:
            _skip(b, end, &pos, key & 7)
    return out

cdef tuple _entry(const unsigned char* b, Py_ssize_t start, Py_ssize_t end, str ns):
    cdef Py_ssize_t pos = start, ln, p, e, p2, e2, vs, vl
    cdef uint64_t key, k2
    cdef dict headers = {}
    cdef object usage = None
    cdef str request_id = "", route = ""
    cdef int64_t tx = 0, first = 0, last = 0
    cdef uint64_t status = 0, req_bytes = 0, resp_bytes = 0
    cdef bint flagged = False
    while pos < end:
        key = _varint(b, end, &pos)
        if key == 10:  # common_properties
            ln = _len(b, end, &pos); p = pos; e = pos + ln; pos = e
            while p < e:
                k2 = _varint(b, e, &p)
                if (k2 & 7) != 2:
                    _skip(b, e, &p, k2 & 7); continue
                ln = _len(b, e, &p)
                if k2 == (7 << 3 | 2): tx = _duration_us(b, p, p + ln)
                elif k2 == (9 << 3 | 2): first = _duration_us(b, p, p + ln)
                elif k2 == (10 << 3 | 2): last = _duration_us(b, p, p + ln)
                elif k2 == (19 << 3 | 2): route = _str(b, p, ln)
                elif k2 == (16 << 3 | 2): flagged = flagged or ln > 0
                elif k2 == (17 << 3 | 2):  # Metadata.filter_metadata = 1
                    p2 = p; e2 = p + ln
                    while p2 < e2:
                        kk = _varint(b, e2, &p2)
                        if kk == 10:
                            vl = _len(b, e2, &p2)
                            name, vs, ln2 = _map_entry(b, p2, p2 + vl)
                            if name == ns:
                                usage = _struct_strings(b, vs, vs + ln2)
                            p2 += vl
                        else:
                            _skip(b, e2, &p2, kk & 7)
                p += ln
        elif key == 26:  # request
            ln = _len(b, end, &pos); p = pos; e = pos + ln; pos = e
            while p < e:
                k2 = _varint(b, e, &p)
                if k2 == (13 << 3 | 2):
                    ln = _len(b, e, &p)
                    name, vs, vl = _map_entry(b, p, p + ln)
                    headers[name] = _str(b, vs, vl)
                    p += ln
                elif k2 == (9 << 3 | 2):
                    ln = _len(b, e, &p); request_id = _str(b, p, ln); p += ln
                elif k2 == (12 << 3 | 0):
                    req_bytes = _varint(b, e, &p)
                else:
                    _skip(b, e, &p, k2 & 7)
        elif key == 34:  # response
            ln = _len(b, end, &pos); p = pos; e = pos + ln; pos = e
            while p < e:
                k2 = _varint(b, e, &p)
                if k2 == 10:
                    ln = _len(b, e, &p); p2 = p; e2 = p + ln
                    while p2 < e2:
                        kk = _varint(b, e2, &p2)
                        if kk == 8: status = _varint(b, e2, &p2)
                        else: _skip(b, e2, &p2, kk & 7)
                    p += ln
                elif k2 == (3 << 3 | 0):
                    resp_bytes = _varint(b, e, &p)
                else:
                    _skip(b, e, &p, k2 & 7)
        else:
            _skip(b, end, &pos, key & 7)
    return (headers, request_id, status, flagged, usage, tx, first, last, route, req_bytes, resp_bytes)

def read_message(bytes data, str ns):
    cdef const unsigned char* b = data
    cdef Py_ssize_t n = len(data), pos = 0, ln, p, e
    cdef uint64_t key, k2
    cdef list out = []
    while pos < n:
        key = _varint(b, n, &pos)
        if key == 18:  # http_logs
            ln = _len(b, n, &pos); p = pos; e = pos + ln; pos = e
            while p < e:
                k2 = _varint(b, e, &p)
                if k2 == 10:
                    ln = _len(b, e, &p)
                    out.append(_entry(b, p, p + ln, ns))
                    p += ln
                else:
                    _skip(b, e, &p, k2 & 7)
        else:
            _skip(b, n, &pos, key & 7)
    return out
