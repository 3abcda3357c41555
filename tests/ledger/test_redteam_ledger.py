"""Red team of the ledger's new tables (sidecar/ledger/postgres.py): an audit event is a
change that happened; two changes are two rows, whatever their overlay versions."""
from __future__ import annotations


from sidecar.ledger.events import AdminEvent
from sidecar.ledger.postgres import PostgresSink


def test_two_changes_with_the_same_overlay_version_are_two_audit_rows(db, pg):
    holder = "redteam-audit-holder"
    db.execute("DELETE FROM kt_admin_audit WHERE holder = %s", (holder,))
    t = 1_800_000_000_000_000
    # a sidecar whose overlay started again at version 0 (its store lost it) sets the same
    # holder a second time: the same (holder, version, action), another change
    first = AdminEvent(at_us=t, who="admin-token", action="set", holder=holder, before="",
                       after='{"block":{"limits":{"rpm":1}}}', version=1, instance="i-1")
    second = AdminEvent(at_us=t + 86_400_000_000, who="loopback 127.0.0.1", action="set",
                        holder=holder, before="", after='{"block":{"limits":{"rpm":100000}}}',
                        version=1, instance="i-2")
    sink = PostgresSink(pg.dsn)
    try:
        sink.write([first])
        sink.write([second])
        sink.write([second])  # a retried batch is still stored once
    finally:
        sink.close()
    rows = db.execute("SELECT who, after FROM kt_admin_audit WHERE holder = %s ORDER BY at",
                      (holder,)).fetchall()
    assert rows == [(first.who, first.after), (second.who, second.after)]
