"""The bench harness: real Envoy, real Valkey, the sidecar, side by side with references.

    python bench/run.py            # full run (~10 minutes on 2 cores), results in bench/results/
    python bench/run.py --smoke    # a few seconds: checks the harness works, asserts no speed

It starts every part itself on ephemeral loopback ports: Valkey, the sidecar (`kt serve`
with the full policy on the Redis backend, gRPC and the HTTP fast path), two do-nothing
ext_authz servers (grpc.aio and raw uvloop HTTP), and one real Envoy per configuration
(`--concurrency 1`, answering with a direct response after reading the body, so the
upstream is not what is measured). Load: wrk (max throughput; requests built once in
init() and cycled) and h2load (a fixed rate, for latency at half load). Needs the Debian
packages wrk and nghttp2-client (h2load).

Every figure is reported with the spread of repeated runs and as a ratio to references
measured in the same run: Envoy alone, Envoy + a do-nothing grpc.aio ext_authz handler,
Envoy + a do-nothing raw uvloop HTTP ext_authz handler.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.envoy_config import EnvoyOptions, TierRoute, render  # noqa: E402
from tests.support.procs import (EnvoyProcess, SidecarProcess, free_port, stop_process,  # noqa: E402
                                 wait_until, workdir)
from tests.support.valkey import Valkey  # noqa: E402

# (input tokens, output tokens) of the profiles capacity planners use
PROFILES = {
    "chat_short": (200, 150),
    "chat_long_context": (4000, 1000),
    "summarization": (8000, 500),
    "embeddings": (500, 0),
    "code_generation": (1500, 2000),
}
TENANTS = 200
HOT_TENANTS = 5  # the "burst" profile: a few tenants far over their RPM


def policy(valkey_url: str) -> str:
    """Full policy: RPM, TPM, USD budget, two tiers; uneven budgets over many tenants."""
    lines = [
        "tenant: {header: x-tenant-id, unknown: defaults}",
        "tiers: [{name: default, model: gpt-4o}, {name: compact, model: gpt-4o-mini}]",
        "pricing:",
        "  gpt-4o: {input: 0.0025, output: 0.01}",
        "  gpt-4o-mini: {input: 0.00015, output: 0.0006}",
        "defaults:",
        "  limits: {rpm: 100000000, tpm: 100000000000}",
        "  budget: {usd: 1000000, period: month, low_water: 0.2}",
        "tenants:",
    ]
    for i in range(TENANTS):
        # uneven: a quarter of the tenants run below low water (downgrade) and then out
        usd = [1000000, 50000, 20, 2][i % 4]
        lines.append(f"  t{i}: {{limits: {{rpm: 100000000, tpm: 100000000000}}, "
                     f"budget: {{usd: {usd}, period: month, low_water: 0.2}}}}")
    for i in range(HOT_TENANTS):
        lines.append(f"  hot{i}: {{limits: {{rpm: 60, tpm: 100000}}}}")
    lines.append(f'backend: {{kind: redis, url: "{valkey_url}", timeout_ms: 100, '
                 'failure_mode: {rate_limits: open, budgets: closed}}')
    return "\n".join(lines) + "\n"


def body(profile: str) -> str:
    inp, out = PROFILES[profile]
    doc: dict = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * (inp * 4 - 40)}]}
    if out:
        doc["max_tokens"] = out
    return json.dumps(doc)


def wrk_script(profile: str, path: Path) -> None:
    tenants = [f"hot{i}" for i in range(HOT_TENANTS)] if profile == "burst" else \
        [f"t{i}" for i in range(TENANTS)]
    payload = body("chat_short" if profile == "burst" else profile)
    path.write_text(f"""
local tenants = {{{",".join(f'"{t}"' for t in tenants)}}}
local body = {json.dumps(payload)}
local reqs = {{}}
local i = 0
function init(args)
  for k, t in ipairs(tenants) do
    reqs[k] = wrk.format("POST", "/v1/chat/completions",
      {{["content-type"] = "application/json", ["x-tenant-id"] = t}}, body)
  end
end
function request()
  i = i % #reqs + 1
  return reqs[i]
end
function done(summary, latency, requests)
  io.write(string.format('KTJSON {{"requests": %d, "duration_us": %d, "errors": %d, '
    .. '"status_errors": %d, "p50": %d, "p95": %d, "p99": %d}}\\n',
    summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
""")


def run_wrk(url: str, script: Path, seconds: float, connections: int) -> dict:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "5s",
                          "-s", str(script), url], capture_output=True, text=True,
                         timeout=seconds + 60)
    m = re.search(r"KTJSON (\{.*\})", out.stdout)
    if not m:
        raise RuntimeError(f"wrk gave no result: {out.stdout}\n{out.stderr}")
    r = json.loads(m.group(1))
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    return r


def run_h2load(url: str, profile: str, rate: float, seconds: float, workdir_: Path) -> dict:
    """A fixed request rate (8 clients x rate/8), latency percentiles from its log."""
    data = workdir_ / f"{profile}.json"
    data.write_text(body(profile))
    log = workdir_ / "h2load.log"
    clients = 8
    n = max(int(rate * seconds), clients)
    subprocess.run(["h2load", "--h1", "-c", str(clients), "-n", str(n),
                    f"--rps={max(rate / clients, 1):.0f}", "-d", str(data),
                    "-H", "content-type: application/json", "-H", "x-tenant-id: t0",
                    "--log-file", str(log), url], capture_output=True, text=True,
                   timeout=seconds * 3 + 60, check=True)
    durations = sorted(int(line.split("\t")[2]) for line in log.read_text().splitlines() if line)
    ok = sum(1 for line in log.read_text().splitlines() if line and line.split("\t")[1] == "200")

    def pct(p: float) -> float:
        return durations[min(len(durations) - 1, int(p / 100 * len(durations)))]

    return {"rate": rate, "requests": len(durations), "ok": ok, "p50": pct(50), "p95": pct(95),
            "p99": pct(99)}


def side_ports(sidecar: SidecarProcess) -> list[int]:
    """Every worker's side port (one with a single process)."""
    doc = json.loads(sidecar.ready.read_text())
    return doc.get("worker_http_ports", [sidecar.http_port])


def scrape(sidecar: SidecarProcess) -> dict:
    """Counters summed over the sidecar's workers."""
    out = {"decisions": 0.0, "round_trips": 0.0, "backend_decisions": 0.0}
    for port in side_ports(sidecar):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line.startswith("kt_requests_total{"):
                out["decisions"] += float(line.rsplit(" ", 1)[1])
            elif line.startswith("kt_backend_round_trips_total{"):
                out["round_trips"] += float(line.rsplit(" ", 1)[1])
            elif line.startswith("kt_backend_decisions_total{"):
                out["backend_decisions"] += float(line.rsplit(" ", 1)[1])
    return out


def cpu_seconds(pid: int) -> float:
    """CPU of a process and its direct children (a --workers supervisor's workers)."""
    def one(p: int) -> float:
        with open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    try:
        children = open(f"/proc/{pid}/task/{pid}/children").read().split()
    except OSError:
        children = []
    return one(pid) + sum(one(int(c)) for c in children)


def probe(url: str) -> None:
    """One keep-alive request: answered, and never with `connection: close` (the
    FIELD-NOTES trap: Envoy closes after a direct response to an unread body)."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
    try:
        conn.request("POST", u.path, body=body("chat_short").encode(),
                     headers={"content-type": "application/json", "x-tenant-id": "t0"})
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise RuntimeError(f"probe {url}: status {r.status}")
        if (r.getheader("connection") or "").lower() == "close":
            raise RuntimeError(f"probe {url}: connection: close — the run would measure reconnects")
    finally:
        conn.close()


def start_noop(kind: str, d: Path) -> tuple[subprocess.Popen, int]:
    ready = d / f"noop-{kind}.json"
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "noop_authz.py"), kind,
                             "--ready-file", str(ready)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    wait_until(lambda: ready.exists(), 20, f"noop {kind} authz")
    return proc, json.loads(ready.read_text())["port"]


def median_spread(vals: list[float]) -> dict:
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "runs": len(vals)}


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    envoy_v = subprocess.run([shutil.which("envoy") or str(Path(sys.executable).parent / "envoy"),
                              "--version"], capture_output=True, text=True).stdout.strip()
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "kernel": platform.release(),
            "python": platform.python_version(), "envoy": envoy_v.split("version:")[-1].strip(),
            "wrk": "wrk (Debian)", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="seconds, not minutes; no speed judged")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args()
    for tool, pkg in (("wrk", "wrk"), ("h2load", "nghttp2-client")):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed: apt-get install {pkg}", file=sys.stderr)
            return 2
    seconds, runs = (1.0, 1) if a.smoke else (a.seconds, a.runs)
    profiles = ["chat_short"] if a.smoke else list(PROFILES) + ["burst"]

    results: dict = {"machine": machine(), "conditions": {
        "seconds_per_run": seconds, "runs": runs, "connections": a.connections,
        "envoy_concurrency": 1, "load_generator": "wrk -t1 (max rate); h2load --h1 (fixed rate)",
        "note": "wrk, Envoy, the sidecar and Valkey share the machine's cores"}, "configs": {}}
    with workdir("kt-bench-") as d, Valkey(d) as valkey:
        pol = d / "policy.yaml"
        pol.write_text(policy(valkey.url))
        sidecar = SidecarProcess(pol, d, ("--http-authz", "127.0.0.1:0")).start()
        wd2 = d / "workers2"
        wd2.mkdir()
        sidecar2 = SidecarProcess(pol, wd2, ("--http-authz", "127.0.0.1:0", "--workers", "2")).start()
        noop_grpc, noop_grpc_port = start_noop("grpc", d)
        noop_http, noop_http_port = start_noop("http", d)
        try:
            configs = {
                "envoy_alone": ("none", "", ""),
                "grpc_noop": ("authz", f"127.0.0.1:{noop_grpc_port}", ""),
                "grpc_sidecar": ("authz", f"127.0.0.1:{sidecar.grpc_port}", ""),
                "http_noop": ("http-authz", "", f"127.0.0.1:{noop_http_port}"),
                "http_sidecar": ("http-authz", "", f"127.0.0.1:{sidecar.http_authz_port}"),
                "http_sidecar_2workers": ("http-authz", "",
                                          f"127.0.0.1:{sidecar2.http_authz_port}"),
            }
            for name, (mode, grpc_addr, http_addr) in configs.items():
                which = sidecar2 if name == "http_sidecar_2workers" else sidecar
                results["configs"][name] = run_config(
                    d, name, mode, grpc_addr, http_addr, which,
                    profiles if name != "http_sidecar_2workers" else ["chat_short"],
                    seconds, runs, a.connections, valkey_pid=valkey.pid)
            # latency at half of the fast path's throughput, against Envoy alone at that rate
            fast = results["configs"]["http_sidecar"]["chat_short"]["rps"]["median"]
            results["half_load_latency"] = half_load(d, configs, fast / 2, 1.0 if a.smoke else 5.0,
                                                     sidecar)
        finally:
            sidecar.stop()
            sidecar2.stop()
            stop_process(noop_grpc)
            stop_process(noop_http)
    summarize(results)
    if not a.smoke:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        (out / f"{stamp}.json").write_text(json.dumps(results, indent=2))
        (out / f"{stamp}.md").write_text(results["markdown"])
        (out / "latest.json").write_text(json.dumps(results, indent=2))
        (out / "latest.md").write_text(results["markdown"])
    print(results["markdown"])
    failures = smoke_failures(results)
    if failures:
        print("bench: FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


def run_config(d: Path, name: str, mode: str, grpc_addr: str, http_addr: str,
               sidecar: SidecarProcess, profiles: list[str], seconds: float, runs: int,
               connections: int, valkey_pid: int = 0) -> dict:
    admin, listen = free_port(), free_port()
    opts = EnvoyOptions(listen_port=listen, admin_port=admin, mode=mode,  # type: ignore[arg-type]
                        sidecar_address=grpc_addr or "127.0.0.1:1",
                        sidecar_http_address=http_addr or "127.0.0.1:1",
                        tiers=[TierRoute("default", "gpt-4o", "127.0.0.1:1"),
                               TierRoute("compact", "gpt-4o-mini", "127.0.0.1:1")],
                        ext_proc=False, direct_response=True, authz_timeout_s=1.0)
    sub = d / name
    sub.mkdir()
    uses_sidecar = "_sidecar" in name
    out: dict = {}
    with EnvoyProcess(render(opts), sub, admin, listen) as envoy:
        url = envoy.url()
        probe(url)
        for profile in (profiles if uses_sidecar else ["chat_short"]):
            script = sub / f"{profile}.lua"
            wrk_script(profile, script)
            samples = []
            for _ in range(runs):
                m0, c0 = (scrape(sidecar), cpu_seconds(sidecar.proc.pid)) \
                    if uses_sidecar else ({}, 0.0)
                v0 = cpu_seconds(valkey_pid) if uses_sidecar and valkey_pid else 0.0
                r = run_wrk(url, script, seconds, connections)
                if uses_sidecar:
                    m1, c1 = scrape(sidecar), cpu_seconds(sidecar.proc.pid)
                    decided = m1["decisions"] - m0["decisions"]
                    r["decisions_per_s"] = decided / (r["duration_us"] / 1e6)
                    bd = m1["backend_decisions"] - m0["backend_decisions"]
                    r["round_trips_per_decision"] = (m1["round_trips"] - m0["round_trips"]) / max(bd, 1)
                    r["cpu_ms_per_1000_decisions"] = 1e6 * (c1 - c0) / max(decided, 1)
                    if valkey_pid:
                        r["valkey_cpu_ms_per_1000_decisions"] = \
                            1e6 * (cpu_seconds(valkey_pid) - v0) / max(decided, 1)
                samples.append(r)
            out[profile] = {k: median_spread([s[k] for s in samples]) for k in samples[0]
                            if isinstance(samples[0][k], (int, float))}
    return out


def decision_latency_buckets(sidecar: SidecarProcess, transport: str) -> dict[float, float]:
    """kt_decision_latency_seconds{transport} as cumulative counts by upper bound (seconds)."""
    out: dict[float, float] = {}
    prefix = 'kt_decision_latency_seconds_bucket{le="'
    for port in side_ports(sidecar):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line.startswith(prefix) and f'transport="{transport}"' in line:
                le = line[len(prefix):].split('"', 1)[0]
                bound = float("inf") if le == "+Inf" else float(le)
                out[bound] = out.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The smallest bucket bound holding a share q of the decisions made between two scrapes
    (an upper bound on the quantile: the histogram cannot say more)."""
    bounds = sorted(after)
    total = after.get(float("inf"), 0.0) - before.get(float("inf"), 0.0)
    if total <= 0:
        return float("nan")
    for b in bounds:
        if after[b] - before.get(b, 0.0) >= q * total:
            return b
    return float("inf")


def half_load(d: Path, configs: dict, rate: float, seconds: float,
              sidecar: Optional[SidecarProcess] = None) -> dict:
    out = {}
    # the do-nothing handlers at the same rate: what any authz hop adds on this machine
    for name in ("envoy_alone", "http_noop", "http_sidecar", "grpc_noop", "grpc_sidecar"):
        mode, grpc_addr, http_addr = configs[name]
        admin, listen = free_port(), free_port()
        opts = EnvoyOptions(listen_port=listen, admin_port=admin, mode=mode,
                            sidecar_address=grpc_addr or "127.0.0.1:1",
                            sidecar_http_address=http_addr or "127.0.0.1:1",
                            ext_proc=False, direct_response=True, authz_timeout_s=1.0)
        sub = d / f"half-{name}"
        sub.mkdir()
        transport = {"http_sidecar": "http", "grpc_sidecar": "authz"}.get(name)
        with EnvoyProcess(render(opts), sub, admin, listen) as envoy:
            before = decision_latency_buckets(sidecar, transport) if sidecar and transport else {}
            out[name] = run_h2load(envoy.url(), "chat_short", rate, seconds, sub)
            if sidecar and transport:
                # the sidecar's own time per decision (parse to answer, Redis round trip
                # included), to tell its share of the added latency from the machine's
                after = decision_latency_buckets(sidecar, transport)
                out[name]["decision_p50_le_us"] = 1e6 * bucket_quantile(before, after, 0.50)
                out[name]["decision_p99_le_us"] = 1e6 * bucket_quantile(before, after, 0.99)
    out["rate"] = rate
    out["added_p99_us_http_sidecar"] = out["http_sidecar"]["p99"] - out["envoy_alone"]["p99"]
    out["added_p99_us_grpc_sidecar"] = out["grpc_sidecar"]["p99"] - out["envoy_alone"]["p99"]
    out["added_p99_us_http_noop"] = out["http_noop"]["p99"] - out["envoy_alone"]["p99"]
    out["added_p99_us_grpc_noop"] = out["grpc_noop"]["p99"] - out["envoy_alone"]["p99"]
    return out


def summarize(res: dict) -> None:
    c = res["configs"]
    ref_envoy = c["envoy_alone"]["chat_short"]["rps"]["median"]
    ref_grpc = c["grpc_noop"]["chat_short"]["rps"]["median"]
    ref_http = c["http_noop"]["chat_short"]["rps"]["median"]
    rows = []
    for name, per_profile in c.items():
        for profile, m in per_profile.items():
            rps = m["rps"]
            row = {
                "config": name, "profile": profile, "rps": rps["median"],
                "rps_min": rps["min"], "rps_max": rps["max"],
                "vs_envoy_alone": rps["median"] / ref_envoy,
                "vs_noop_same_transport": rps["median"] / (ref_grpc if name.startswith("grpc")
                                                           else ref_http if name.startswith("http")
                                                           else ref_envoy),
                "p50_ms": m["p50"]["median"] / 1000, "p95_ms": m["p95"]["median"] / 1000,
                "p99_ms": m["p99"]["median"] / 1000,
                "errors": m["errors"]["max"],
            }
            for k in ("decisions_per_s", "round_trips_per_decision", "cpu_ms_per_1000_decisions",
                      "valkey_cpu_ms_per_1000_decisions"):
                if k in m:
                    row[k] = m[k]["median"]
            rows.append(row)
    res["rows"] = rows
    targets = {
        "grpc_sidecar_vs_grpc_noop (target >= 0.90)":
            c["grpc_sidecar"]["chat_short"]["rps"]["median"] / ref_grpc,
        "http_sidecar_vs_envoy_alone (target >= 0.35)":
            c["http_sidecar"]["chat_short"]["rps"]["median"] / ref_envoy,
    }
    hl = res.get("half_load_latency", {})
    if hl:
        targets["http_sidecar added p99 at half its max rate, ms (target < 2)"] = \
            hl["added_p99_us_http_sidecar"] / 1000
        targets["(reference) do-nothing HTTP handler's added p99 at the same rate, ms"] = \
            hl["added_p99_us_http_noop"] / 1000
    res["targets"] = targets
    m = res["machine"]
    lines = [f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, Python "
             f"{m['python']}, Envoy {m['envoy']}, {m['date']}. "
             f"{res['conditions']['runs']} run(s) of {res['conditions']['seconds_per_run']} s, "
             f"{res['conditions']['connections']} connections, Envoy --concurrency 1; load "
             "generator, Envoy, sidecar and Valkey share the cores.", "",
             "| config | profile | req/s median (min–max) | × Envoy alone | × do-nothing same transport "
             "| p50 ms | p95 ms | p99 ms | decisions/s | round trips/decision | sidecar CPU ms/1k decisions | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['profile']} | {r['rps']:.0f} ({r['rps_min']:.0f}–{r['rps_max']:.0f}) "
            f"| {r['vs_envoy_alone']:.3f} | {r['vs_noop_same_transport']:.3f} | {r['p50_ms']:.2f} "
            f"| {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r.get('decisions_per_s', float('nan')):.0f} | "
            f"{r.get('round_trips_per_decision', float('nan')):.3f} | "
            f"{r.get('cpu_ms_per_1000_decisions', float('nan')):.1f} | {r['errors']} |")
    lines += ["", "| target (issue 5) | measured |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in targets.items()]
    if hl:
        lines += ["", f"Fixed rate {hl['rate']:.0f} req/s (half the fast path's max), h2load, p99 µs: "
                  + ", ".join(f"{n} {hl[n]['p99']:.0f}" for n in (
                      "envoy_alone", "http_noop", "http_sidecar", "grpc_noop", "grpc_sidecar"))
                  + "; inside the sidecar (kt_decision_latency_seconds, bucket bounds): "
                  + ", ".join(f"{n} p50 ≤ {hl[n].get('decision_p50_le_us', float('nan')):.0f}, "
                              f"p99 ≤ {hl[n].get('decision_p99_le_us', float('nan')):.0f}"
                              for n in ("http_sidecar", "grpc_sidecar"))]
    res["markdown"] = "\n".join(lines) + "\n"


def smoke_failures(res: dict) -> list[str]:
    """What makes a run unusable (not slow): a configuration that served nothing or erred."""
    bad = []
    for name, per_profile in res["configs"].items():
        for profile, m in per_profile.items():
            if m["requests"]["min"] <= 0:
                bad.append(f"{name}/{profile}: no requests")
            if m["errors"]["max"] > 0:
                bad.append(f"{name}/{profile}: {m['errors']['max']} socket errors")
            # the sidecar's 429s are answers; a reference must never answer non-2xx
            if "_sidecar" not in name and m["status_errors"]["max"] > 0:
                bad.append(f"{name}/{profile}: {m['status_errors']['max']} non-2xx answers")
            if "_sidecar" in name and m["decisions_per_s"]["min"] <= 0:
                bad.append(f"{name}/{profile}: the sidecar decided nothing")
    hl = res.get("half_load_latency", {})
    for name in ("http_sidecar", "grpc_sidecar"):
        if name in hl and not hl[name].get("decision_p99_le_us", float("nan")) > 0:
            bad.append(f"half load/{name}: no decision latency recorded by the sidecar")
    return bad


if __name__ == "__main__":
    sys.exit(main())
