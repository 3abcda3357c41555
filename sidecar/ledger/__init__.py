"""The ledger: what was spent, request by request, kept where a FinOps engineer can
reconcile it with a provider's invoice.

- ``events.py``  the records (msgspec Structs): one ``UsageEvent`` per closed
  reservation, ``RefusalsEvent`` per tenant/reason/minute, ``ThresholdEvent`` per
  budget fraction crossed, ``AnomalyEvent`` per token-rate flag started or cleared; one
  JSON line each.
- ``sinks.py``   where records go: JSON Lines files (rotation, retention), the spill file.
- ``postgres.py`` the PostgreSQL sink (psycopg 3, batched, idempotent) and its schema.
- ``storable.py`` every value made storable before a sink sees it (a documented escape).
- ``sinkcall.py`` the deadline on every sink call, which holds when the server hangs.
- ``deadletter.py`` events a sink refuses, set aside one by one with the reason.
- ``writer.py``  the bounded buffer and the writer thread between the event loop and a sink:
  spill, replay, isolating a refused event.
- ``recorder.py`` what the decision service calls: builds events, aggregates refusals,
  watches budget thresholds.
- ``stats.py``, ``cli.py``  ``kt events stats`` / ``kt events migrate``.
"""
