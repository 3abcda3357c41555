"""The hand-assembled ext_authz allow answer equals the protobuf library's encoding."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from envoy.service.auth.v3 import external_auth_pb2

from sidecar import contract
from sidecar.transports.authz import check_response_bytes, header_options, metadata_struct

header_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=300)
header_values = st.text(min_size=0, max_size=300)  # any unicode, incl. multi-byte


@given(st.lists(st.tuples(header_names, header_values), max_size=12),
       st.lists(st.tuples(header_names, header_values), max_size=12),
       st.dictionaries(st.sampled_from(["decision", "tenant", "tier", "model"]),
                       st.text(max_size=50), max_size=4))
def test_fast_allow_encoding_matches_the_library(up, down, md):
    ans = contract.Answer(status=200, upstream_headers=tuple(up), response_headers=tuple(down),
                          metadata=md or None)
    fast = external_auth_pb2.CheckResponse.FromString(check_response_bytes(ans))
    slow = external_auth_pb2.CheckResponse(
        status={"code": 0},
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=header_options(up), response_headers_to_add=header_options(down)))
    if md:
        slow.dynamic_metadata.CopyFrom(metadata_struct(md))
    assert fast == slow
    assert fast.WhichOneof("http_response") == "ok_response"
