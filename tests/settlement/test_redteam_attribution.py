"""Red team of the attribution (sidecar/attribution.py, settlement/attributed.py): what a
flood of invented end users and tags costs the other tenants' books."""
from __future__ import annotations

import logging
import socket


from sidecar.attribution import OTHER, Attribution, SpendCap
from sidecar.backends.redis import RedisBackend
from sidecar.ledger.spend import SpendRecord
from sidecar.policy.load import parse_policy
from tests.settlement.test_attribution import POLICY, TRUSTED
from tests.support.inproc import RunningSidecar


def test_a_flood_of_invented_tenants_leaves_named_tenants_their_own_users():
    """Finding 2: the process-wide bound on attribution names was first come, first
    served: ten invented tenants (under `unknown: defaults` a client names its own) at
    their daily cap spent every other tenant's new end users as _other for the day. Now
    the tenants the policy does not name share one pool of their own."""
    cap = SpendCap()  # the defaults a sidecar runs with
    day = 20_000
    floods = cap.names_max // (2 * cap.per_tenant_day)
    admitted = 0
    for t in range(floods):
        for i in range(cap.per_tenant_day):
            admitted += cap.admit(f"flood-{t}", day, "user", f"u{i}", named=False) != OTHER
            admitted += cap.admit(f"flood-{t}", day, "tag", f"t{i}", named=False) != OTHER
    assert admitted == cap.unnamed_per_day  # the invented tenants' pool, no more
    assert len(cap) == cap.unnamed_per_day
    # a tenant the policy names keeps its own room, and its users are its own
    assert cap.admit("acme", day, "user", "alice") == "alice"
    for i in range(cap.per_tenant_day - 1):
        assert cap.admit("acme", day, "user", f"user-{i}") != OTHER
    assert cap.admit("acme", day, "user", "one-too-many") == OTHER  # its own bound holds
    # the pool is per day: the next day the invented tenants start again, yesterday's
    # names are still remembered (late cells), the day before is forgotten
    assert cap.admit("flood-0", day + 1, "user", "new", named=False) == "new"
    cap.admit("acme", day + 2, "user", "alice")
    assert len(cap) == 2  # day + 1's "new" and day + 2's "alice"


def test_a_store_outage_logs_one_line_for_the_attributed_cells_not_one_each(caplog):
    """Finding 8 (fixed here): with the store down, each second's flush logged a warning per
    (tenant, user or tag) cell it could not write: a fleet with thousands of end users
    wrote thousands of log lines a second for the whole outage."""
    with socket.socket() as s:  # a port nothing listens on: Redis down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    policy = POLICY % TRUSTED + f"backend: {{kind: redis, url: 'redis://127.0.0.1:{port}/0'}}\n"
    compiled = parse_policy(policy.encode(), "<test>")
    with RunningSidecar(policy, backend=RedisBackend(compiled.backend)) as sc:
        attributed = sc.sidecar.service.settlement.attributed
        spend = SpendRecord("gpt-4o", 1, 10, 1, 0, 0, 1000)
        for i in range(500):
            attributed.add("acme", Attribution(f"user-{i}", ("nightly",)), spend, 20_000)
        with caplog.at_level(logging.WARNING, logger="kt.attribution"):
            for _ in range(3):  # three seconds of the outage
                assert sc.run(attributed.flush()) == 0
                for i in range(500):
                    attributed.add("acme", Attribution(f"user-{i}"), spend, 20_000)
    lines = [r.getMessage() for r in caplog.records if r.name == "kt.attribution"]
    assert len(lines) == 1, len(lines)
    assert "501 attributed spend cells not recorded" in lines[0]
