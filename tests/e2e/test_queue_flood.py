"""A flood of the admission queue through a real Envoy cannot switch the limits off nor
lock a high-priority tenant out: three low-priority tenants at rpm 60 on 1,100 keep-alive
connections, the queue as deployed (max_wait_ms 2000, max_size 1000), the Envoy config
`kt envoy-config --config` prints. Nothing is admitted by the failure mode, Envoy's
circuit breaker to the sidecar never overflows (its admin stats), and a high-priority
tenant's 20 requests sent in the middle of the flood are admitted (18 at least: a loaded
machine may let Envoy's own timeout take one or two). Counts only, no timings. The flood
runs at a lower CPU priority than the stack (tests/support/flood.py says why)."""
from __future__ import annotations

import pytest

from tests.support.flood import flood_stack, run_flood

pytestmark = pytest.mark.envoy

LOW = ["low-a", "low-b", "low-c"]


@pytest.mark.parametrize("backend", [pytest.param("redis", marks=pytest.mark.valkey), "memory"])
def test_a_queue_flood_admits_nothing_by_the_failure_mode_and_keeps_high_priority(backend):
    # The flood saturates this machine's 2 cores (generator, Envoy, sidecar and Valkey
    # share them, with other work): Valkey's own slowlog showed single script calls of
    # 30-50 ms during it, a silence the default 50 ms counts as a store that stopped
    # answering. The store gets 150 ms here (ext_authz's deadline); tests/backends/test_burst.py
    # holds the default settings to no failure-mode answer.
    with flood_stack(backend, "max_wait_ms: 2000, max_size: 1000",
                     redis_settings="timeout_ms: 150") as stack:
        counts, vip = run_flood(stack.port, LOW, connections=1100, seconds=6.0,
                                vip="vip", vip_requests=20, vip_after_s=3.0)
        by_failure_mode = stack.failure_mode_decisions()
        overflows = stack.breaker_overflows()
        admitted_low = stack.decisions("allow")
        warnings = stack.log_warnings()
    assert sum(v for k, v in counts.items() if isinstance(k, int)) > 1100  # it did flood
    assert by_failure_mode == 0, (counts, warnings)
    assert not any(overflows.values()), overflows
    assert sum(s == 200 for s in vip) >= 18, (vip, counts)
    # three rpm-60 tenants (a full bucket, then one a second for the flood and its
    # stragglers), plus the vip's 20: nowhere near what the flood sent
    assert admitted_low <= 3 * (60 + 12) + 20, (admitted_low, counts)
