"""The two flows over one reservation book: the decider (request → decision, which
reserves) and the settlement service (finished response → settled charge and ledger
event, which closes the reservation). The server builds one of these and hands the
decider to the deciding transports and the settlement service to the usage transports."""
from __future__ import annotations

from typing import Optional

from sidecar import anomaly
from sidecar.backends.base import Backend
from sidecar.decision.queue import Timer
from sidecar.decision.service import Decider
from sidecar.ledger.recorder import Ledger
from sidecar.metrics import Metrics
from sidecar.policy.load import CompiledPolicy
from sidecar.settlement.book import ReservationBook
from sidecar.settlement.service import SettlementService


class Flows:
    def __init__(self, policy: CompiledPolicy, backend: Backend, metrics: Optional[Metrics] = None,
                 ledger: Optional[Ledger] = None, queue_timer: Optional[Timer] = None) -> None:
        self.backend = backend
        self.metrics = metrics or Metrics()
        self.ledger = ledger or Ledger(None)
        self.reservations = ReservationBook()
        self.settlement = SettlementService(policy, backend, self.reservations, self.metrics,
                                            self.ledger)
        self.decider = Decider(policy, backend, self.reservations, self.settlement.late,
                               self.metrics, self.ledger, queue_timer)
        # one token-rate watch: the settlement feeds it, the decision reads its flags
        self._set_anomalies(anomaly.watch_for(policy.anomaly))

    @property
    def policy(self) -> CompiledPolicy:
        return self.decider.policy

    def replace_policy(self, policy: CompiledPolicy) -> None:
        """A reloaded policy, for both flows at once (on the event loop: no await between)."""
        self.decider.replace_policy(policy)
        self.settlement.replace_policy(policy)
        self._set_anomalies(anomaly.watch_for(policy.anomaly, self.decider.anomalies))

    def _set_anomalies(self, watch: Optional[anomaly.TokenRateWatch]) -> None:
        old = self.settlement.anomalies
        if old is not None and old is not watch:
            old.end_all()  # its flags end in the books; the new watch judges afresh
        self.decider.anomalies = self.settlement.anomalies = watch
        if watch is not None:
            # a flag's start and end, whoever judged it: the log, metrics, ledger event
            watch.listener = self.settlement.anomaly_changed

    def sweep_anomalies(self) -> None:
        """Judge again the flagged tenants that went quiet (the server, every few seconds):
        a flag ends within a minute of the tenant's last tokens, in the books too."""
        if self.settlement.anomalies is not None:
            self.settlement.anomalies.sweep()
