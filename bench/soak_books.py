"""The soak's verdict: the provider's own log, the ledger's events in PostgreSQL, `kt spend`
and the budgets in Valkey compared per tenant, every difference given a cause, the
admissions checked against every limit, and the processes' growth bounded.

    python bench/soak_books.py bench/results/soak-<time>-work/books.json   # the report again
                                                                          # (runs with --keep)

The join is by reservation id: the sidecar's answer puts it on the request
(`x-kt-reservation`), the provider logs it, the ledger's event is keyed by it. Each
request the provider saw is classified by what the books did with it:
- expected: `settled` with exactly the provider's usage (a 200 delivered to its end);
  `released` at no charge (a provider error); `kept` at the estimate (the client left
  mid-stream, or usage could not arrive: counted by kt_reservations_closed_total);
- explained: no event, and the sidecar that decided it was SIGKILLed while it was open
  or its event was in the killed process's buffer; no event, its Envoy restarted with the
  access-log entry (its reservation stays open, to expire as kept); no event, and the
  ledger counted events lost (kt_ledger_events_total{state="lost"});
- unexplained: anything else (usage that differs from the provider's, a request charged
  twice, a settled event for a request never served, a kept estimate recorded at 0, no
  event and no cause).
Per tenant, `kt spend` must equal the events but for the requests lost above, and what
the budget holds beyond both must fit in the estimates of the requests that can hold one.
"""
from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import yaml

JITTER_S = 1.0  # how much earlier, relative to the others, a request may reach the provider
# a sidecar killed this long before (a decision's answer in flight) to this long after a
# request reached the provider (its reply, up to the held streams' 15 s, the access log,
# the ledger's buffer) may lose its event
KILL_WINDOW_S = (-1.0, 30.0)
# an Envoy restarted within this of a request reaching the provider may take its
# access-log entry with it (entries are sent within about a second of the reply's end)
ENVOY_WINDOW_S = (-1.0, 5.0)
RSS_GROWTH = (1.5, 64 << 20)  # end <= start x 1.5 + 64 MiB
FD_GROWTH = 64  # end <= start + 64 open files
# decisions whose answer came after the timeout, their charge kept (Envoy decided alone)
LATE_KEPT = 'kt_backend_late_replies_total{action="kept"}'
WARM_UP_S = 10.0  # a process's "start" sample is its first this long after it appeared


@dataclass
class Books:
    sent: list  # soak_load.Sent
    served: list  # soak_upstream.Served
    events: list[dict]
    spend: dict
    budgets: dict[str, int]
    instances: dict[tuple[str, int], dict[str, float]]  # (gateway, pid) -> last /metrics
    final: set[tuple[str, int]]  # the sidecar instances alive at the end
    prices: dict[str, tuple[int, int]]
    faults: list[tuple]
    procs: dict[tuple[str, int], list[tuple[float, int, int]]]
    ledger: list[tuple[float, str, float, float, float, float]]  # per scrape, soak.Observer
    envoy_stats: dict[tuple[str, int], dict[str, float]]  # (gateway, pid) -> ext_authz stats
    limits: dict[str, tuple[float, float, float]]
    quiesced: bool
    started: float  # time.time() at the start of the run

    @property
    def metrics(self) -> dict[str, float]:
        """Every series summed over every sidecar instance."""
        out: dict[str, float] = {}
        for series in self.instances.values():
            for k, v in series.items():
                out[k] = out.get(k, 0.0) + v
        return out


@dataclass
class Report:
    markdown: str
    ok: bool
    failures: list[str] = field(default_factory=list)


def limits_from_policy(text: str) -> dict[str, tuple[float, float, float]]:
    """tenant -> (rpm, tpm, burst); "" for the defaults."""
    doc = yaml.safe_load(text)
    out = {}
    d = doc["defaults"]["limits"]
    out[""] = (d["rpm"], d["tpm"], d.get("burst", 1.0))
    for name, t in (doc.get("tenants") or {}).items():
        lim = t.get("limits", d)
        out[name] = (lim["rpm"], lim["tpm"], lim.get("burst", 1.0))
    return out


def worst_excess(points: list[tuple[float, int]], per_minute: float, burst: float) -> float:
    """max over intervals [t_i, t_j] of sum(amounts) - (limit x burst + limit x (T + jitter)/60):
    > 0 means more was admitted than any token bucket with these settings allows."""
    rate = per_minute / 60.0
    cap = per_minute * burst + rate * JITTER_S
    best = float("-inf")
    running = float("-inf")  # max over i <= j of rate * t_i - S_{i-1}
    s = 0
    for t, amount in points:
        running = max(running, rate * t - s)
        s += amount
        best = max(best, s - rate * t + running - cap)
    return best


def cost(prices: dict, model: str, inp: int, out: int) -> int:
    p_in, p_out = prices.get(model, max(prices.values()))
    return inp * p_in + out * p_out


def near(b: Books, s, fault: str, window: tuple[float, float]) -> bool:
    """Whether a fault whose name starts with ``fault`` began within ``window`` of the
    provider receiving ``s``."""
    return any(name.startswith(fault) and s.at + window[0] <= start <= s.at + window[1]
               for name, start, _, _, _ in b.faults)


def classify(b: Books) -> tuple[dict, list[str], dict[str, list], Counter]:
    """Per reservation: what the provider did and what the books did. Returns the counts
    of each class, the unexplained lines, and per tenant the requests (as the provider saw
    them) with no event whose loss a counted cause explains (their charge is in the budget
    and maybe in the spend, never in the events), and per gateway how many reservations an
    Envoy restart left open (the access-log entries it held died with it)."""
    by_id: dict[str, list[dict]] = defaultdict(list)
    for e in b.events:
        by_id[e["request_id"]].append(e)
    first: dict[str, Any] = {}
    retries = 0
    for s in sorted(b.served, key=lambda s: s.at):
        if s.reservation in first:
            retries += 1  # Envoy sent the same admitted request again
            continue
        first[s.reservation] = s
    lost_counted = b.metrics.get('kt_ledger_events_total{state="lost"}', 0.0)
    classes: Counter = Counter()
    unexplained: list[str] = []
    lost_with_cause: dict[str, list] = defaultdict(list)
    open_by_envoy: Counter = Counter()  # gateway -> reservations left open by its restart
    for rid, s in first.items():
        evs = by_id.get(rid, [])
        outcomes = sorted(e["outcome"] for e in evs)
        if not rid:
            classes["no reservation id (not decided by a sidecar)"] += 1
            unexplained.append(f"a request reached the provider without a reservation id "
                               f"(tenant {s.tenant!r}, decision {s.decision!r})")
            continue
        if len(evs) > 1:
            classes["charged twice (" + "+".join(outcomes) + ")"] += 1
            unexplained.append(f"{rid} ({s.tenant}) has events {outcomes}: charged twice")
            continue
        if not evs:
            near_kill = near(b, s, f"sidecar {s.gateway} SIGKILL", KILL_WINDOW_S)
            near_envoy_restart = near(b, s, f"envoy {s.gateway} restart", ENVOY_WINDOW_S)
            if near_kill:
                classes["no event: its sidecar was SIGKILLed (reservation or event lost)"] += 1
                lost_with_cause[s.tenant].append(s)
            elif near_envoy_restart:
                classes["no event yet: usage lost with its Envoy's restart (reservation open: "
                        "it expires as kept in 10 min)"] += 1
                lost_with_cause[s.tenant].append(s)
                open_by_envoy[s.gateway] += 1
            elif lost_counted:
                classes["no event: ledger counted events lost"] += 1
                lost_with_cause[s.tenant].append(s)
            else:
                classes["no event, no cause"] += 1
                unexplained.append(f"{rid} ({s.tenant}, status {s.status}, "
                                   f"{'stream' if s.stream else 'json'}, gateway {s.gateway}, "
                                   f"at {s.at - b.started:.1f} s, during "
                                   f"{during(b, s.at)}) has no event")
            continue
        e = evs[0]
        if s.status != 200:
            if e["outcome"] == "released" and e["budget_charge"] == 0:
                classes["provider error: released, no charge"] += 1
            elif e["outcome"] in ("kept", "expired"):
                classes[f"provider error: {e['outcome']} ({e['settled_by']})"] += 1
            else:
                classes[f"provider error: {e['outcome']}"] += 1
                unexplained.append(f"{rid} ({s.tenant}): provider said {s.status}, "
                                   f"books say {e['outcome']}")
            continue
        if e["outcome"] == "settled":
            got = (e["input_tokens"], e["output_tokens"], e["cached_tokens"])
            want = (s.input_tokens, s.output_tokens, s.cached_tokens)
            if got == want and e["cost_nano_usd"] == cost(b.prices, e["model_served"],
                                                          s.input_tokens, s.output_tokens):
                classes["settled, exactly the provider's usage"
                        + (" (client left, usage passed)" if s.leave else "")] += 1
            else:
                classes["settled with other usage"] += 1
                unexplained.append(f"{rid} ({s.tenant}): settled {got}, provider {want}")
        elif e["outcome"] in ("kept", "expired"):
            why = "client left mid-stream" if s.leave else \
                "usage did not arrive" if s.completed else "the reply was cut (provider side)"
            if e["cost_nano_usd"] <= 0 or (e["budget_unit"] and e["budget_charge"] <= 0):
                classes[f"{e['outcome']} ({e['settled_by']}): {why}, recorded at 0"] += 1
                unexplained.append(
                    f"{rid} ({s.tenant}): estimate of {e['estimate_tokens']} tokens kept but "
                    f"recorded at {e['cost_nano_usd']} nano-USD, charge {e['budget_charge']} "
                    f"{e['budget_unit'] or '(no budget)'}; the provider billed "
                    f"{s.input_tokens}+{s.output_tokens} tokens")
            else:
                classes[f"{e['outcome']} ({e['settled_by']}): {why}, charged at its bound (or its estimate)"] += 1
        else:
            classes[f"served 200 but {e['outcome']}"] += 1
            unexplained.append(f"{rid} ({s.tenant}): provider served 200, books say "
                               f"{e['outcome']}")
    orphans = [e for rid, evs in by_id.items() if rid not in first for e in evs]
    for e in orphans:
        if e["outcome"] in ("kept", "expired"):
            classes[f"event without a provider request: {e['outcome']} ({e['settled_by']})"] += 1
        else:
            classes[f"event without a provider request: {e['outcome']}"] += 1
            if e["outcome"] == "settled":
                unexplained.append(f"{e['request_id']} ({e['tenant']}): settled, never served")
    if retries:
        classes["provider saw an admitted request again (Envoy retry)"] += retries
    return dict(classes), unexplained, lost_with_cause, open_by_envoy


def open_reservations(metrics: dict[str, float]) -> float:
    """Admitted decisions not yet closed, by the counters of every sidecar instance: each
    admission ends as one settlement (access log, ext_proc, report, release) or one
    reservation closed without usage (kept_*); a released one counts in both."""
    admitted = sum(v for k, v in metrics.items() if k.startswith("kt_requests_total{")
                   and any(f'decision="{d}"' in k for d in ("allow", "downgrade", "fail_open")))
    settled = sum(v for k, v in metrics.items() if k.startswith("kt_settlements_total{"))
    kept = sum(v for k, v in metrics.items() if k.startswith("kt_reservations_closed_total{")
               and 'outcome="kept' in k)
    return admitted - settled - kept


def max_charge(b: Books, s, unit: str) -> int:
    """The most a request's reservation can hold in the budget's unit (its estimate, priced
    at the dearest tier when the budget is in USD)."""
    if unit == "tokens":
        return s.prompt_tokens + s.max_tokens
    return max(s.prompt_tokens * p_in + s.max_tokens * p_out for p_in, p_out in
               b.prices.values())


def charged_unrecorded(b: Books, tenant: str, lost: list) -> list:
    """The tenant's requests that may hold an estimate in the budget that neither the spend
    nor the events show: those lost with a SIGKILLed sidecar before settlement, and those
    the gateway refused with an error of its own (no answer, a 503 not the provider's)
    during a fault, after the store may have charged them (the answer lost with the
    sidecar or the store's connection, or too late: kt_backend_late_replies_total)."""
    by_seq = {s.seq: s for s in b.sent}
    out = [by_seq[x.seq] for x in lost if x.seq in by_seq]
    out += [s for s in b.sent if s.tenant == tenant and during(b, s.at) != "-"
            and s.error != "skipped" and (
                s.status == 0 or (s.status == 503 and s.reason != "server_error"))]
    return out


def per_tenant(b: Books, lost_with_cause: dict[str, list]
               ) -> tuple[list[list], list[str], list[str]]:
    """Rows of the side-by-side table, the differences a counted cause explains (the
    tenant has requests whose event was lost with a killed sidecar or counted lost) and
    those none does."""
    up: dict[str, Counter] = defaultdict(Counter)
    seen = set()
    for s in b.served:
        if s.reservation in seen:
            continue
        seen.add(s.reservation)
        c = up[s.tenant]
        c["arrived"] += 1
        if s.status == 200:
            c["ok"] += 1
            c["in"] += s.input_tokens
            c["out"] += s.output_tokens
            c["cached"] += s.cached_tokens
            c["cost"] += cost(b.prices, s.model, s.input_tokens, s.output_tokens)
    ev: dict[str, Counter] = defaultdict(Counter)
    for e in b.events:
        c = ev[e["tenant"]]
        c[e["outcome"]] += 1
        c["charge"] += e["budget_charge"]
        # a kept or expired event carries the tokens it was charged (the bound, or the
        # estimate kept), as the durable spend does
        if e["outcome"] in ("settled", "kept", "expired"):
            c["in"] += e["input_tokens"]
            c["out"] += e["output_tokens"]
            c["cached"] += e["cached_tokens"]
        c["cost"] += e["cost_nano_usd"]
    sp: dict[str, Counter] = defaultdict(Counter)
    for tenant, models in (b.spend.get("tenants") or {}).items():
        for counts in models.values():
            sp[tenant]["requests"] += counts["requests"]
            sp[tenant]["in"] += counts["input_tokens"]
            sp[tenant]["out"] += counts["output_tokens"]
            sp[tenant]["cost"] += counts["cost_nano_usd"]
    rows, explained, issues = [], [], []
    for t in sorted(set(up) | set(ev) | set(sp)):
        diffs: list[str] = []
        u, e, s = up[t], ev[t], sp[t]
        budget = b.budgets.get(t)
        closed = e["settled"] + e["kept"] + e["expired"]
        rows.append([t, u["arrived"], u["ok"], f"{u['in']}/{u['out']}/{u['cached']}", u["cost"],
                     e["settled"], e["released"], e["kept"] + e["expired"],
                     f"{e['in']}/{e['out']}/{e['cached']}", e["cost"],
                     s["requests"], f"{s['in']}/{s['out']}", s["cost"],
                     "-" if budget is None else budget, e["charge"]])
        if s["requests"] != closed:
            diffs.append(f"{t}: kt spend counts {s['requests']} requests, the events "
                         f"{closed} (settled + kept + expired)")
        if (s["in"], s["out"]) != (e["in"], e["out"]):
            diffs.append(f"{t}: kt spend tokens {s['in']}/{s['out']}, events "
                         f"{e['in']}/{e['out']}")
        if s["cost"] != e["cost"]:
            diffs.append(f"{t}: kt spend {s['cost']} nano-USD, events {e['cost']}")
        lost = lost_with_cause.get(t, [])
        missing = s["requests"] - closed  # requests in the spend without an event
        if diffs and lost and 0 <= missing <= len(lost):
            explained += [f"{d}: {len(lost)} of its requests have no event (their sidecar "
                          f"or Envoy was lost with it, or the ledger counted it lost)"
                          for d in diffs]
        else:
            issues += diffs
        if budget is None:
            continue
        # what the budget holds beyond the events and beyond the lost events' spend
        unit = next((x["budget_unit"] for x in b.events if x["tenant"] == t), "")
        lost_amount = s["cost"] - e["cost"] if unit == "usd" else \
            (s["in"] + s["out"]) - (e["in"] + e["out"])
        # what `kt spend` shows held for requests never settled (docs/ledger.md, "Held"):
        # estimates charged whose usage never came (lost with a killed sidecar, say)
        held = ((b.spend.get("held") or {}).get(t) or {}).get("amount", 0)
        residual = budget - e["charge"] - lost_amount - held
        if residual == 0:
            if held:
                explained.append(f"{t}: budget in Valkey {budget} = events' charges "
                                 f"{e['charge']} + lost events' spend {lost_amount} + held "
                                 f"{held} (estimates never settled, shown by kt spend)")
            continue
        cands = charged_unrecorded(b, t, lost)
        bound = sum(max_charge(b, c, unit) for c in cands)
        line = (f"{t}: budget in Valkey {budget}, events' charges {e['charge']}, lost "
                f"events' spend {lost_amount}, held {held}: {residual} {unit or 'units'} "
                f"charged and recorded nowhere")
        if 0 < residual <= bound:
            explained.append(
                f"{line}, within the estimates of {len(cands)} request(s) lost with a killed "
                f"sidecar or Envoy, or refused by the gateway during "
                + ", ".join(sorted({during(b, c.at) for c in cands}))
                + f" (at most {bound}; {LATE_KEPT} = {b.metrics.get(LATE_KEPT, 0):g})")
        else:
            issues.append(f"{line}; the requests that could hold it hold at most {bound}")
    return rows, explained, issues


def admissions(b: Books) -> tuple[list[list], list[str]]:
    by_tenant: dict[str, list] = defaultdict(list)
    seen = set()
    for s in sorted(b.served, key=lambda s: s.at):
        if s.reservation in seen:
            continue
        seen.add(s.reservation)
        by_tenant[s.tenant].append(s)
    rows, over = [], []
    for t, reqs in sorted(by_tenant.items()):
        rpm, tpm, burst = b.limits.get(t, b.limits[""])
        t0 = reqs[0].at
        r_ex = worst_excess([(s.at - t0, 1) for s in reqs], rpm, burst)
        t_ex = worst_excess([(s.at - t0, (s.input_tokens + s.output_tokens)
                              if s.status == 200 else 0) for s in reqs], tpm, burst)
        per_min: Counter = Counter(int(s.at // 60) for s in reqs)
        rows.append([t, len(reqs), rpm, burst, max(per_min.values()), f"{r_ex:+.1f}",
                     tpm, f"{t_ex:+.0f}"])
        if r_ex > 0:
            over.append(f"{t}: {r_ex:.1f} requests over its RPM bucket in some interval")
        if t_ex > 0:
            over.append(f"{t}: {t_ex:.0f} tokens over its TPM bucket in some interval")
    return rows, over


def growth(b: Books) -> tuple[list[list], list[str]]:
    """First sample after an instance's warm-up against its last; an instance that lived
    less than two warm-ups is reported, not judged (a process just started or restarted
    is still loading, connecting and filling its caches)."""
    rows, bad = [], []
    for (role, pid), samples in sorted(b.procs.items()):
        born = samples[0][0]
        warm = [x for x in samples if x[0] - born >= WARM_UP_S] or samples[-1:]
        (_, rss1, fd1), (t2, rss2, fd2) = warm[0], samples[-1]
        judged = t2 - born >= 2 * WARM_UP_S
        rows.append([role, pid, f"{t2 - born:.0f}", f"{rss1 / 2**20:.1f}", f"{rss2 / 2**20:.1f}",
                     fd1, fd2, "yes" if judged else "no (short-lived)"])
        if judged and (rss2 > rss1 * RSS_GROWTH[0] + RSS_GROWTH[1] or fd2 > fd1 + FD_GROWTH):
            bad.append(f"{role} (pid {pid}): RSS {rss1 >> 20} -> {rss2 >> 20} MiB, "
                       f"open files {fd1} -> {fd2}")
    return rows, bad


def ledger_in_faults(b: Books) -> list[list]:
    """For each PostgreSQL fault and gateway: what the sidecar's ledger metrics said from
    the fault's start to 10 s after its end (the sink reported down? events held in memory,
    spilled, written?) and when its buffer was empty again."""
    rows = []
    for name, start, end, _, _ in b.faults:
        if "postgres" not in name:
            continue
        for gw in sorted({x[1] for x in b.ledger}):
            seen = [x for x in b.ledger if x[1] == gw and start <= x[0] <= end + 10.0]
            if not seen:
                continue
            after = [x for x in b.ledger if x[1] == gw and x[0] > end]
            empty = next((x[0] for x in after if x[2] == 0), None)
            rows.append([name, gw, f"{max(x[2] for x in seen):g}",
                         "yes" if min(x[3] for x in seen) < 1 else "no",
                         f"{seen[-1][5] - seen[0][5]:+g}", f"{seen[-1][4] - seen[0][4]:+g}",
                         "never" if empty is None else f"{empty - end:.1f}"])
    return rows


def during(b: Books, t: float) -> str:
    """The fault a request was sent during (from 1 s before it to 5 s after it ended; of
    two, the later)."""
    hits = [(start, name) for name, start, end, _, _ in b.faults
            if start - 1.0 <= t <= end + 5.0]
    return max(hits)[1] if hits else "-"


def table(head: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def report(b: Books, minutes: float, rate: float, stamp: str) -> Report:
    failures: list[str] = []
    statuses = Counter((s.status, s.reason or s.error) for s in b.sent)
    # answers neither the sidecar's decision (200, 429) nor the provider's error made
    gateway_errors = Counter((s.status, s.reason or s.error, s.gateway, during(b, s.at))
                             for s in b.sent if s.status not in (200, 429)
                             and s.reason != "server_error" and s.error != "skipped")
    kinds = Counter(s.kind for s in b.sent)
    classes, unexplained, lost_with_cause, open_by_envoy = classify(b)
    tenant_rows, tenant_explained, tenant_issues = per_tenant(b, lost_with_cause)
    adm_rows, over = admissions(b)
    grow_rows, grew = growth(b)
    failures += [f"over-admission: {x}" for x in over]
    failures += [f"unexplained: {x}" for x in unexplained]
    failures += [f"growth: {x}" for x in grew]
    failures += [f"books: {x}" for x in tenant_issues]
    # reservations a killed instance held are lost with it (its requests above show
    # as "no event" or as kept by another replica); a live one must have closed them all
    open_live = {k: open_reservations(m) for k, m in b.instances.items() if k in b.final}
    open_killed = {k: open_reservations(m) for k, m in b.instances.items()
                   if k not in b.final}
    # an Envoy restart leaves open the reservations whose access-log entries it held
    for (g, pid), n in sorted(open_live.items()):
        if n - open_by_envoy[g] <= 0:
            continue
        envoy_errors = sum(v for (eg, _), st in b.envoy_stats.items() if eg == g
                           for k, v in st.items() if k.endswith("ext_authz.error"))
        failures.append(
            f"{n - open_by_envoy[g]:g} reservation(s) still open in live sidecar {g} (pid "
            f"{pid}) after the run beyond those an Envoy restart explains (admitted - settled "
            f"- kept by its counters): each will expire as kept in 10 min, charging its "
            f"estimate (again, if its usage was applied); Envoy {g} counted {envoy_errors:g} "
            f"ext_authz call(s) that failed or timed out")
    failures += [f"the fault '{name}' could not be applied: {err}"
                 for name, _, _, _, err in b.faults if err]
    if not b.quiesced:
        failures.append("the sidecars' usage log and ledger did not settle within 90 s")
    if "error" in b.spend:
        failures.append(f"kt spend failed: {b.spend['error']}")
    explained_causes = {k: v for k, v in classes.items()}
    m = b.metrics
    counted = {k: v for k, v in sorted(m.items()) if k.startswith((
        "kt_reservations_closed_total", "kt_settlements_total", "kt_ledger_events_total",
        "kt_backend_late_replies_total", "kt_backend_errors_total",
        "kt_failure_mode_decisions_total", "kt_requests_total")) and v}
    md = [f"# Soak {stamp}", "",
          f"`python bench/soak.py --minutes {minutes:g} --rate {rate:g}`; started "
          f"{datetime.fromtimestamp(b.started, timezone.utc):%Y-%m-%d %H:%M:%S} UTC. "
          f"Two gateways (A: gRPC ext_authz, B: HTTP fast path) on one Valkey (AOF, fsync "
          f"always), PostgreSQL as the ledger's sink.", "",
          f"**Verdict: {'PASS' if not failures else 'FAIL'}** "
          f"({len(failures)} invariant failure(s))", ""]
    if failures:
        md += [f"- {f}" for f in failures[:60]]
        if len(failures) > 60:
            md.append(f"- ... and {len(failures) - 60} more")
        md.append("")
    md += ["## Faults", "", table(["fault", "start (s)", "took (s)", "detail", "error"], [
        [n, f"{s - b.started:.1f}", f"{e - s:.1f}", d, err] for n, s, e, d, err in b.faults]), ""]
    md += ["## Requests", "",
           f"{len(b.sent)} sent ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}); "
           f"the provider saw {len(b.served)} (one per admitted request unless Envoy retried).",
           table(["status", "reason / client error", "count"],
                 [[*k, n] for k, n in sorted(statuses.items())]), "",
           "Answers that are neither a decision (200, 429) nor a provider error, with the "
           "fault each was sent during (from 1 s before it to 5 s after it ended; '-': none):",
           "", table(["status", "reason / client error", "gateway", "during fault", "count"],
                     [[*k, n] for k, n in sorted(gateway_errors.items())]), ""]
    md += ["## The ledger through PostgreSQL's faults", "",
           "Each sidecar's ledger metrics, scraped every 2 s from the fault's start to 10 s "
           "after its end (counter deltas can include a restart of the sidecar: then "
           "negative).", "",
           table(["fault", "gateway", "max buffered events", "kt_ledger_sink_up fell to 0",
                  "spilled", "written", "buffer empty again (s after the fault)"],
                 ledger_in_faults(b)), ""]
    md += ["## Every request the provider saw, by what the books did with it", "",
           table(["class", "requests"], sorted(explained_causes.items(),
                                                key=lambda kv: -kv[1])), ""]
    md += ["## The books side by side, per tenant", "",
           "provider: requests that reached it, 200s, tokens in/out/cached and their price "
           "(nano-USD); events (PostgreSQL): settled, released, kept+expired, settled tokens, "
           "cost; `kt spend`: requests, tokens, cost; the budget in Valkey (its unit: "
           "nano-USD or tokens) and the events' `budget_charge` sum.", "",
           table(["tenant", "prov. req", "prov. 200", "prov. tokens", "prov. cost",
                  "ev. settled", "ev. released", "ev. kept", "ev. tokens", "ev. cost",
                  "spend req", "spend tokens", "spend cost", "budget", "Σ charge"],
                 tenant_rows), ""]
    if tenant_explained or tenant_issues:
        md += ["Differences between the aggregates (a kept estimate differs from the "
               "provider's usage by design and is not listed):", ""]
        md += [f"- explained: {x}" for x in tenant_explained]
        md += [f"- **unexplained**: {x}" for x in tenant_issues]
        md.append("")
    md += ["## Counted causes (every sidecar instance's last /metrics, summed)", "",
           table(["series", "value"], [[f"`{k}`", f"{v:g}"] for k, v in counted.items()]), ""]
    envoy_rows = [[g, p, f"`{k}`", f"{v:g}"] for (g, p), st in sorted(b.envoy_stats.items())
                  for k, v in sorted(st.items())]
    md += ["Envoy's ext_authz counters (each Envoy instance's last scrape; `error` and "
           "`failure_mode_allowed` are calls that did not get the sidecar's answer in time, "
           "after which the sidecar may have charged a request Envoy refused):", "",
           table(["gateway", "envoy pid", "stat", "value"], envoy_rows), ""]
    md += ["Reservations left open (admitted - settled - kept, by each instance's last "
           "scrape; a killed instance's were lost with it, up to the decisions made after "
           "that scrape):", "",
           table(["sidecar", "pid", "state", "open"],
                 [[g, p, "live at the end", f"{n:g}"] for (g, p), n in sorted(open_live.items())]
                 + [[g, p, "SIGKILLed", f"{n:g}"] for (g, p), n in sorted(open_killed.items())]),
           ""]
    md += ["## Admissions against every limit", "",
           f"From the provider's own log (arrival times, one entry per reservation): the "
           f"worst excess over any interval of the token bucket's bound (limit x burst + "
           f"limit x (T + {JITTER_S:g} s)/60); <= 0 is within the limit. TPM counts the "
           f"provider's usage, which the load keeps at or below each estimate.", "",
           table(["tenant", "admitted", "rpm", "burst", "max in a clock minute",
                  "RPM worst excess", "tpm", "TPM worst excess"], adm_rows), ""]
    md += ["## Processes: RSS and open files of each instance, after its warm-up and at the end",
           "", f"Sampled every few seconds; 'start' is the first sample {WARM_UP_S:g} s after the "
           f"instance appeared (a restarted process is a new instance). Bound: RSS end <= "
           f"start x {RSS_GROWTH[0]:g} + {RSS_GROWTH[1] >> 20} MiB, open "
           f"files end <= start + {FD_GROWTH} (postgres: the postmaster and its backends).",
           "", table(["process", "pid", "lived (s)", "RSS start (MiB)", "RSS end (MiB)",
                      "fds start", "fds end", "judged"], grow_rows), ""]
    return Report("\n".join(md) + "\n", not failures, failures)


def dump(b: Books, minutes: float, rate: float, stamp: str) -> str:
    """The raw books as JSON, for ``load`` (the report computed again, e.g. after a change
    to this module, without running the soak again)."""
    return json.dumps({
        "minutes": minutes, "rate": rate, "stamp": stamp,
        "sent": [asdict(x) for x in b.sent], "served": [asdict(x) for x in b.served],
        "events": b.events, "spend": b.spend, "budgets": b.budgets,
        "instances": [[g, p, m] for (g, p), m in b.instances.items()],
        "final": sorted(b.final), "prices": b.prices, "faults": b.faults,
        "procs": [[role, pid, samples] for (role, pid), samples in b.procs.items()],
        "ledger": b.ledger, "limits": b.limits, "quiesced": b.quiesced,
        "envoy_stats": [[g, p, st] for (g, p), st in b.envoy_stats.items()],
        "started": b.started}, default=str)


def load(text: str) -> tuple[Books, float, float, str]:
    from soak_load import Sent
    from soak_upstream import Served

    d = json.loads(text)
    return Books(
        sent=[Sent(**x) for x in d["sent"]], served=[Served(**x) for x in d["served"]],
        events=d["events"], spend=d["spend"], budgets=d["budgets"],
        instances={(g, p): m for g, p, m in d["instances"]},
        final={tuple(x) for x in d["final"]},
        prices={k: tuple(v) for k, v in d["prices"].items()},
        faults=[tuple(x) for x in d["faults"]],
        procs={(r, p): [tuple(x) for x in samples] for r, p, samples in d["procs"]},
        ledger=[tuple(x) for x in d["ledger"]],
        envoy_stats={(g, p): st for g, p, st in d["envoy_stats"]},
        limits={k: tuple(v) for k, v in d["limits"].items()},
        quiesced=d["quiesced"], started=d["started"]), d["minutes"], d["rate"], d["stamp"]


if __name__ == "__main__":
    books, minutes, rate, stamp = load(open(sys.argv[1]).read())
    result = report(books, minutes, rate, stamp)
    print(result.markdown)
    raise SystemExit(0 if result.ok else 1)
