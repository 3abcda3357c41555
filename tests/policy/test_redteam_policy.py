"""Red team of the policy's attribution section (sidecar/policy/load.py): its header names
are removed at the edge unless trusted, and kept in the books when trusted."""
from __future__ import annotations

import pytest

from sidecar.policy.load import PolicyError, parse_policy
from tests.transports.test_tenants_api import POLICY


@pytest.mark.parametrize("header, clash", [
    ("x-tenant-id", "tenant.header"),
    ("x-kt-estimated-tokens", "estimate.header"),
    ("x-kt-tier", "a header of the sidecar's own"),
    ("authorization", "a header Envoy or the provider needs"),
])
def test_an_attribution_header_cannot_be_another_header_of_the_request(header, clash):
    """Finding 10 (fixed here): `attribution: {user_header: x-tenant-id}` compiled, and
    kt envoy-config then removed every client's tenant header at the edge (untrusted); as
    `authorization` and trusted, a client's key would be kept as its end user's id."""
    for name in ("user_header", "tags_header"):
        doc = POLICY + f"attribution: {{{name}: {header}}}\n"
        with pytest.raises(PolicyError) as err:
            parse_policy(doc.encode(), "policy.yaml")
        (error,) = err.value.errors
        assert error.startswith(f"policy.yaml: $.attribution.{name}: {header!r} is {clash}: "
                                "name a header of its own (line "), error
    # its own names compile, as before
    parse_policy((POLICY + "attribution: {user_header: x-end-user, tags_header: x-tags}\n"
                  ).encode(), "policy.yaml")
