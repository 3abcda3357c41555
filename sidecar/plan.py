"""`kt plan`: how many sidecar cores (workers) and Redis cores a request rate needs,
computed from a bench harness result (bench/results/*.json), never from guesses.

The result file gives, for each transport and workload profile, the sidecar's CPU per
decision and Valkey's CPU per decision, measured in that run on that machine; the plan
scales them to the asked rate with a headroom factor. The answer is only as good as the
resemblance between that machine and yours: run `python bench/run.py` on your hardware.
Without `--results`, the package's reference result (the repository's
bench/results/latest.json, copied in at build time) answers, and the plan says so.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

TRANSPORTS = {"http": "http_sidecar", "grpc": "grpc_sidecar"}


class PlanError(ValueError):
    """The result file cannot answer the question; the message says why."""


@dataclass(frozen=True)
class Plan:
    rps: float
    transport: str
    profile: str
    headroom: float
    sidecar_cpu_us: float  # per decision, measured
    valkey_cpu_us: float  # per decision, measured
    sidecar_cores: int
    redis_cores: int
    source: str
    machine: str
    # per request with its usage settled: this transport's decision plus what settling
    # costs (the full-path run's access-log path minus its decision-only path, same run,
    # mixed workload), when the result measured it: what a gateway that reconciles runs
    settle_sidecar_cpu_us: Optional[float] = None
    settle_valkey_cpu_us: Optional[float] = None
    full_sidecar_cpu_us: Optional[float] = None
    full_valkey_cpu_us: Optional[float] = None
    full_sidecar_cores: int = 0
    full_redis_cores: int = 0

    def text(self) -> str:
        return (
            f"{self.rps:.0f} req/s, {self.transport} ext_authz, profile {self.profile}, "
            f"headroom x{self.headroom:g}\n"
            f"  sidecar: {self.sidecar_cpu_us:.0f} us CPU per decision (measured) -> "
            f"{self.sidecar_cores} core(s): `kt serve --workers {self.sidecar_cores}` "
            "(Redis backend), or spread over gateway pods\n"
            f"  redis:   {self.valkey_cpu_us:.0f} us Valkey CPU per decision (measured) -> "
            f"{self.redis_cores} core(s); shard tenants over a cluster beyond one\n"
            + (f"  with usage reconciled by Envoy's access log: + {self.settle_sidecar_cpu_us:.0f} "
               f"us sidecar and + {self.settle_valkey_cpu_us:.0f} us Valkey CPU to settle each "
               f"request (measured: the full path minus its decision alone) = sidecar "
               f"{self.full_sidecar_cpu_us:.0f} us, Valkey {self.full_valkey_cpu_us:.0f} us per "
               f"request -> "
               f"{self.full_sidecar_cores} sidecar core(s), {self.full_redis_cores} Redis "
               "core(s)\n"
               if self.full_sidecar_cpu_us is not None and self.full_valkey_cpu_us is not None
               else "  (settling usage is not included: this result has no full-path "
               "measurement)\n")
            + f"  from {self.source} ({self.machine})")


REFERENCE = "bench_reference.json"  # package data (setup.py)
MAKE_ONE = ("run `python bench/run.py` in a clone of the repository (on hardware like "
            "yours) and pass --results bench/results/latest.json")


def _read(results_path: Optional[str | Path]) -> tuple[dict, str]:
    if results_path is None:
        ref = resources.files("sidecar").joinpath(REFERENCE)
        if not ref.is_file():
            raise PlanError(f"this installation carries no reference bench result: {MAKE_ONE}")
        doc = json.loads(ref.read_text())
        return doc, f"the reference result shipped with kt-sidecar ({doc.get('source', '')})"
    try:
        return json.loads(Path(results_path).read_text()), str(results_path)
    except (OSError, ValueError) as exc:
        raise PlanError(f"{results_path}: not a readable bench result ({exc}); "
                        f"to make one, {MAKE_ONE}") from None


def plan(results_path: Optional[str | Path], rps: float, transport: str = "http",
         profile: str = "chat_short", headroom: float = 1.5) -> Plan:
    if rps <= 0 or headroom < 1:
        raise PlanError("--rps must be > 0 and --headroom >= 1")
    config = TRANSPORTS.get(transport)
    if config is None:
        raise PlanError(f"--transport must be one of {', '.join(TRANSPORTS)}")
    doc, source = _read(results_path)
    try:
        measured = doc["configs"][config][profile]
        sidecar_us = measured["cpu_ms_per_1000_decisions"]["median"]
    except (KeyError, TypeError):
        raise PlanError(f"{source}: no {config}/{profile} measurement "
                        "(run `python bench/run.py` without --smoke)") from None
    valkey = measured.get("valkey_cpu_ms_per_1000_decisions")
    if valkey is None:
        raise PlanError(f"{source}: no Valkey CPU measurement (a result from an older "
                        "harness; run `python bench/run.py` again)")
    valkey_us = valkey["median"]
    full: dict = {}
    try:
        # settling alone: the same run's full path with usage by the access log minus
        # the same path deciding only; added to this transport's own decision, so a plan
        # for gRPC does not borrow the HTTP fast path's cheaper decision
        paths = doc["full_path"]["configs"]
        als, decision = paths["path_als"]["mixed"], paths["path_decision"]["mixed"]
        for kind in ("sidecar", "valkey"):
            key = f"{kind}_cpu_ms_per_1000"
            settle = max(0.0, float(als[key]["median"]) - float(decision[key]["median"]))
            full[f"settle_{kind}_cpu_us"] = settle
        full["full_sidecar_cpu_us"] = sidecar_us + full["settle_sidecar_cpu_us"]
        full["full_valkey_cpu_us"] = valkey_us + full["settle_valkey_cpu_us"]
    except (KeyError, TypeError, ValueError):
        full = {}  # an older result, or a smoke run: the decision alone
    if full:
        full["full_sidecar_cores"] = max(1, math.ceil(
            rps * full["full_sidecar_cpu_us"] / 1e6 * headroom))
        full["full_redis_cores"] = max(1, math.ceil(
            rps * full["full_valkey_cpu_us"] / 1e6 * headroom))
    m = doc.get("machine", {})
    return Plan(
        rps=rps, transport=transport, profile=profile, headroom=headroom,
        sidecar_cpu_us=sidecar_us, valkey_cpu_us=valkey_us,
        sidecar_cores=max(1, math.ceil(rps * sidecar_us / 1e6 * headroom)),
        redis_cores=max(1, math.ceil(rps * valkey_us / 1e6 * headroom)),
        source=source,
        machine=f"{m.get('cpus', '?')} CPUs {m.get('cpu_model', '')}, {m.get('date', '')}".strip(),
        **full)
