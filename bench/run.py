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
import itertools
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
from typing import Callable, Optional

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
    lines += full_path_tenants()
    # leases on: hot tenants decide in process (docs/redis.md, "Capacity leases")
    lines.append(f'backend: {{kind: redis, url: "{valkey_url}", timeout_ms: 100, leases: true, '
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
    """Counters summed over the sidecar's workers: decisions, the backend's round trips and
    decisions, decisions answered by a failure mode (any mode) and shed (overloaded)."""
    out = {"decisions": 0.0, "round_trips": 0.0, "backend_decisions": 0.0,
           "failure_mode": 0.0, "overloaded": 0.0}
    for port in side_ports(sidecar):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line.startswith("kt_requests_total{"):
                out["decisions"] += float(line.rsplit(" ", 1)[1])
                if 'decision="overloaded"' in line:
                    out["overloaded"] += float(line.rsplit(" ", 1)[1])
            elif line.startswith("kt_failure_mode_decisions_total{"):
                out["failure_mode"] += float(line.rsplit(" ", 1)[1])
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


# --- the full path: Envoy -> decision -> fake upstream -> usage reconciled ------------
FULL_TENANTS = 200  # u0..u199: the long tail
FULL_HOT = 5  # h0..h4: half of all requests, well within their limits (lease candidates)


def full_path_tenants() -> list[str]:
    """RPM, TPM and a USD budget each; uneven budgets over the tail (a quarter small enough
    to run out within a run), a tenth of the tail downgraded (low water crossed after a few
    requests, so the compact route and its body rewrite carry traffic), five hot tenants."""
    lines = []
    for i in range(FULL_TENANTS):
        usd = [1000000, 50000, 100, 5][i % 4]
        low = 0.9999 if i % 10 == 7 else 0.2
        lines.append(f"  u{i}: {{limits: {{rpm: 100000000, tpm: 100000000000}}, "
                     f"budget: {{usd: {usd}, period: month, low_water: {low}}}}}")
    for i in range(FULL_HOT):
        lines.append(f"  h{i}: {{limits: {{rpm: 100000000, tpm: 100000000000}}, "
                     "budget: {usd: 5000000, period: month, low_water: 0.1}}")
    return lines


def full_path_requests(hot_only: bool = False) -> list[tuple[str, bool]]:
    """(tenant, streamed) in the order wrk cycles them: every other request goes to a hot
    tenant (so hot tenants carry half the load, a tenth each), every other pair streams."""
    out: list[tuple[str, bool]] = []
    for i in range(FULL_TENANTS):
        tail = f"h{i % FULL_HOT}" if hot_only else f"u{i}"
        out.append((tail, i % 2 == 1))
        out.append((f"h{i % FULL_HOT}", i % 2 == 0))
    return out


def wrk_script_full(path: Path, hot_only: bool = False) -> None:
    from bench.upstream import STREAM_HEADER

    inp, out = PROFILES["chat_short"]
    plain = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * (inp * 4 - 40)}],
             "max_tokens": out}
    streamed = dict(plain, stream=True, stream_options={"include_usage": True})
    reqs = []
    for tenant, is_stream in full_path_requests(hot_only):
        headers = {"content-type": "application/json", "x-tenant-id": tenant}
        if is_stream:
            headers[STREAM_HEADER] = "1"
        lua_headers = ", ".join(f'["{k}"] = "{v}"' for k, v in headers.items())
        reqs.append(f'  {{{{{lua_headers}}}, {json.dumps(json.dumps(streamed if is_stream else plain))}}}')
    path.write_text("""
local specs = {
%s
}
local reqs = {}
local i = 0
function init(args)
  for k, s in ipairs(specs) do
    reqs[k] = wrk.format("POST", "/v1/chat/completions", s[1], s[2])
  end
end
function request()
  i = i %% #reqs + 1
  return reqs[i]
end
local statuses = {}
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
function done(summary, latency, requests)
  io.write(string.format('KTJSON {"requests": %%d, "duration_us": %%d, "errors": %%d, '
    .. '"status_errors": %%d, "p50": %%d, "p95": %%d, "p99": %%d}\\n',
    summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
""" % ",\n".join(reqs))


def valkey_info(port: int, section: str) -> str:
    """INFO <section> over a raw socket, read to the end of its bulk reply."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"*2\r\n$4\r\nINFO\r\n$%d\r\n%s\r\n" % (len(section), section.encode()))
        data = b""
        while b"\r\n" not in data:
            data += s.recv(65536)
        head, _, rest = data.partition(b"\r\n")
        size = int(head[1:])
        while len(rest) < size:
            rest += s.recv(65536)
    return rest[:size].decode()


def valkey_calls(port: int) -> dict[str, int]:
    """Commands Valkey has run, by name (INFO commandstats; a script's own calls included)."""
    out: dict[str, int] = {}
    for line in valkey_info(port, "commandstats").splitlines():
        m = re.match(r"cmdstat_([^:]+):calls=(\d+)", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def settlements(sidecar: SidecarProcess) -> float:
    total = 0.0
    for port in side_ports(sidecar):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("kt_settlements_total{"):
                    total += float(line.rsplit(" ", 1)[1])
    return total


# name -> (Envoy mode, how usage is reconciled); every one goes to the same fake upstream
FULL_PATH_CONFIGS: dict[str, tuple[str, str]] = {
    "path_upstream": ("none", "none"),          # Envoy -> upstream, no kt filter (reference)
    "path_decision": ("http-authz", "none"),    # + the decision (HTTP fast path), no usage
    "path_ext_proc": ("http-authz", "ext_proc"),  # + usage by ext_proc (per-request stream)
    "path_als": ("http-authz", "als"),  # + usage by Envoy's Lua filter and access log (default)
}


def full_path(d: Path, valkey: Valkey, fresh_sidecar: Callable[[], SidecarProcess],
              seconds: float, runs: int, connections: int, smoke: bool) -> dict:
    """The whole request path side by side in one run: the upstream alone, Envoy -> upstream
    with no kt filter, the decision only, and decision + usage reconciliation."""
    from bench.upstream import bootstrap as upstream_bootstrap

    sub = d / "full-path"
    sub.mkdir()
    up_admin, up_default, up_compact = free_port(), free_port(), free_port()
    up_yaml = upstream_bootstrap(up_admin, {"default": (up_default, "gpt-4o"),
                                            "compact": (up_compact, "gpt-4o-mini")})
    scripts = {"mixed": sub / "mixed.lua", "hot_only": sub / "hot_only.lua"}
    wrk_script_full(scripts["mixed"])
    wrk_script_full(scripts["hot_only"], hot_only=True)
    out: dict = {"configs": {}}
    with EnvoyProcess(up_yaml, sub, up_admin, up_default) as upstream:
        probe(f"http://127.0.0.1:{up_default}/v1/chat/completions")
        # the upstream on its own, with the same requests: it must not be the bottleneck
        samples = []
        for _ in range(runs):
            u0 = cpu_seconds(upstream.proc.pid)
            r = run_wrk(f"http://127.0.0.1:{up_default}/v1/chat/completions", scripts["mixed"],
                        seconds, connections)
            r["upstream_cpu_ms_per_1000"] = 1e6 * (cpu_seconds(upstream.proc.pid) - u0) / max(
                r["requests"], 1)
            samples.append(r)
        out["upstream_alone"] = _summary(samples)
        for name, (mode, usage) in FULL_PATH_CONFIGS.items():
            per_profile = {}
            for profile in (["mixed"] if name == "path_upstream" else ["mixed", "hot_only"]):
                per_profile[profile] = run_full_config(
                    sub, name, mode, usage, fresh_sidecar, valkey, upstream.proc.pid,
                    {"default": up_default, "compact": up_compact}, scripts[profile],
                    seconds, runs, connections)
            out["configs"][name] = per_profile
    return out


def _summary(samples: list[dict]) -> dict:
    return {k: median_spread([s[k] for s in samples]) for k in samples[0]
            if isinstance(samples[0][k], (int, float))}


def run_full_config(d: Path, name: str, mode: str, usage: str,
                    fresh_sidecar: Callable[[], SidecarProcess], valkey: Valkey,
                    upstream_pid: int, upstream_ports: dict[str, int], script: Path,
                    seconds: float, runs: int, connections: int) -> dict:
    # every configuration starts from the same books (no budget spent, no bucket drawn,
    # no reservation held) on a sidecar of its own
    sidecar = fresh_sidecar()
    try:
        return _run_full_config(d, name, mode, usage, sidecar, valkey, upstream_pid,
                                upstream_ports, script, seconds, runs, connections)
    finally:
        sidecar.stop()


def _run_full_config(d: Path, name: str, mode: str, usage: str, sidecar: SidecarProcess,
                     valkey: Valkey, upstream_pid: int, upstream_ports: dict[str, int],
                     script: Path, seconds: float, runs: int, connections: int) -> dict:
    admin, listen = free_port(), free_port()
    opts = EnvoyOptions(listen_port=listen, admin_port=admin, mode=mode,  # type: ignore[arg-type]
                        sidecar_address=f"127.0.0.1:{sidecar.grpc_port}",
                        sidecar_http_address=f"127.0.0.1:{sidecar.http_authz_port}",
                        tiers=[TierRoute("default", "gpt-4o", f"127.0.0.1:{upstream_ports['default']}"),
                               TierRoute("compact", "gpt-4o-mini",
                                         f"127.0.0.1:{upstream_ports['compact']}")],
                        usage=usage, authz_timeout_s=1.0)  # type: ignore[arg-type]
    sub = d / f"{name}-{script.stem}"
    sub.mkdir()
    uses_sidecar = mode != "none"
    samples = []
    with EnvoyProcess(render(opts), sub, admin, listen) as envoy:
        probe(envoy.url())
        for _ in range(runs):
            c0 = {"envoy": cpu_seconds(envoy.proc.pid), "upstream": cpu_seconds(upstream_pid),
                  "sidecar": cpu_seconds(sidecar.proc.pid), "valkey": cpu_seconds(valkey.pid)}
            calls0, settled0 = valkey_calls(valkey.port), settlements(sidecar)
            m0 = scrape(sidecar)
            r = run_wrk(envoy.url(), script, seconds, connections)
            n = max(r["requests"], 1)
            for k, pid in (("envoy", envoy.proc.pid), ("upstream", upstream_pid),
                           ("sidecar", sidecar.proc.pid), ("valkey", valkey.pid)):
                r[f"{k}_cpu_ms_per_1000"] = 1e6 * (cpu_seconds(pid) - c0[k]) / n
            calls1 = valkey_calls(valkey.port)
            r["valkey_calls_per_request"] = (sum(calls1.values()) - sum(calls0.values())) / n
            r["valkey_script_calls_per_request"] = sum(
                calls1.get(c, 0) - calls0.get(c, 0) for c in ("evalsha", "evalsha_ro")) / n
            r["settlements_per_request"] = (settlements(sidecar) - settled0) / n
            r["decisions_per_request"] = (scrape(sidecar)["decisions"] - m0["decisions"]) / n
            if not uses_sidecar:
                for k in ("sidecar_cpu_ms_per_1000", "valkey_cpu_ms_per_1000"):
                    r.pop(k)
            samples.append(r)
    return _summary(samples)


def valkey_command(port: int, *args: str) -> None:
    import socket

    payload = b"*%d\r\n" % len(args) + b"".join(
        b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        reply = s.recv(1024)
    if not reply.startswith(b"+"):
        raise RuntimeError(f"valkey {args[0]}: {reply!r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="seconds, not minutes; no speed judged")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--only", choices=["full-path"],
                    help="one section alone, printed and not saved (for iterating on it)")
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
        started = itertools.count()

        def fresh_sidecar(workers: int = 1) -> SidecarProcess:
            """A sidecar started for one measurement, on a Valkey emptied for it. Every
            measurement starts from the same books, and none pays for what an earlier one
            left: a decision-only load gets no usage back, so its reservations pile up to
            the book's cap (100,000), past which each decision also closes the oldest (an
            expiry event and a spend record in Valkey). One sidecar for the whole run
            measured the later configurations with a full book."""
            valkey_command(valkey.port, "FLUSHALL")
            sub = d / f"sidecar-{next(started)}"
            sub.mkdir()
            extra = ("--workers", str(workers)) if workers > 1 else ()
            return SidecarProcess(pol, sub, ("--http-authz", "127.0.0.1:0", *extra)).start()

        if a.only == "full-path":
            fp = full_path(d, valkey, fresh_sidecar, seconds, runs, a.connections, a.smoke)
            print("\n".join(full_path_markdown(fp, {})))
            return 0
        noop_grpc, noop_grpc_port = start_noop("grpc", d)
        noop_http, noop_http_port = start_noop("http", d)
        try:
            # (mode, gRPC address, HTTP address, the sidecar each profile gets, or None);
            # "sidecar": the address of that profile's own sidecar
            configs: dict[str, tuple[str, str, str, Optional[Callable[[], SidecarProcess]]]] = {
                "envoy_alone": ("none", "", "", None),
                "grpc_noop": ("authz", f"127.0.0.1:{noop_grpc_port}", "", None),
                "grpc_sidecar": ("authz", "sidecar", "", fresh_sidecar),
                "http_noop": ("http-authz", "", f"127.0.0.1:{noop_http_port}", None),
                "http_sidecar": ("http-authz", "", "sidecar", fresh_sidecar),
                "http_sidecar_2workers": ("http-authz", "", "sidecar",
                                          lambda: fresh_sidecar(workers=2)),
            }
            for name, (mode, grpc_addr, http_addr, factory) in configs.items():
                results["configs"][name] = run_config(
                    d, name, mode, grpc_addr, http_addr, factory,
                    profiles if name != "http_sidecar_2workers" else ["chat_short"],
                    seconds, runs, a.connections, valkey_pid=valkey.pid)
            # latency at half of the fast path's throughput, against Envoy alone at that rate
            fast = results["configs"]["http_sidecar"]["chat_short"]["rps"]["median"]
            half_sidecar = fresh_sidecar()
            try:
                addresses = {"grpc": f"127.0.0.1:{half_sidecar.grpc_port}",
                             "http": f"127.0.0.1:{half_sidecar.http_authz_port}"}
                half_configs = {
                    name: (mode, addresses["grpc"] if g == "sidecar" else g,
                           addresses["http"] if h == "sidecar" else h)
                    for name, (mode, g, h, _) in configs.items()}
                results["half_load_latency"] = half_load(
                    d, half_configs, fast / 2, 1.0 if a.smoke else 5.0, half_sidecar)
            finally:
                half_sidecar.stop()
            results["full_path"] = full_path(d, valkey, fresh_sidecar, seconds, runs,
                                             a.connections, a.smoke)
        finally:
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
               fresh_sidecar: Optional[Callable[[], SidecarProcess]], profiles: list[str],
               seconds: float, runs: int, connections: int, valkey_pid: int = 0) -> dict:
    """One configuration, profile by profile. With ``fresh_sidecar`` (the sidecar's
    configurations) each profile is measured on a sidecar of its own, started for it, and
    an Envoy pointed at it (grpc_addr/http_addr are then taken from that sidecar)."""
    sub = d / name
    sub.mkdir()
    out: dict = {}
    for profile in (profiles if fresh_sidecar is not None else ["chat_short"]):
        sidecar = fresh_sidecar() if fresh_sidecar is not None else None
        try:
            if sidecar is not None:
                grpc_addr = f"127.0.0.1:{sidecar.grpc_port}" if grpc_addr else ""
                http_addr = f"127.0.0.1:{sidecar.http_authz_port}" if http_addr else ""
            out[profile] = _run_profile(sub, profile, mode, grpc_addr, http_addr, sidecar,
                                        seconds, runs, connections, valkey_pid)
        finally:
            if sidecar is not None:
                sidecar.stop()
    return out


def _run_profile(sub: Path, profile: str, mode: str, grpc_addr: str, http_addr: str,
                 sidecar: Optional[SidecarProcess], seconds: float, runs: int,
                 connections: int, valkey_pid: int) -> dict:
    admin, listen = free_port(), free_port()
    opts = EnvoyOptions(listen_port=listen, admin_port=admin, mode=mode,  # type: ignore[arg-type]
                        sidecar_address=grpc_addr or "127.0.0.1:1",
                        sidecar_http_address=http_addr or "127.0.0.1:1",
                        tiers=[TierRoute("default", "gpt-4o", "127.0.0.1:1"),
                               TierRoute("compact", "gpt-4o-mini", "127.0.0.1:1")],
                        usage="none", direct_response=True, authz_timeout_s=1.0)
    envoy_dir = sub / f"envoy-{profile}"
    envoy_dir.mkdir()
    script = sub / f"{profile}.lua"
    wrk_script(profile, script)
    samples = []
    with EnvoyProcess(render(opts), envoy_dir, admin, listen) as envoy:
        url = envoy.url()
        probe(url)
        for _ in range(runs):
            m0, c0 = (scrape(sidecar), cpu_seconds(sidecar.proc.pid)) \
                if sidecar is not None else ({}, 0.0)
            v0 = cpu_seconds(valkey_pid) if sidecar is not None and valkey_pid else 0.0
            r = run_wrk(url, script, seconds, connections)
            if sidecar is not None:
                m1, c1 = scrape(sidecar), cpu_seconds(sidecar.proc.pid)
                decided = m1["decisions"] - m0["decisions"]
                r["decisions_per_s"] = decided / (r["duration_us"] / 1e6)
                bd = m1["backend_decisions"] - m0["backend_decisions"]
                r["round_trips_per_decision"] = (m1["round_trips"] - m0["round_trips"]) / max(bd, 1)
                r["cpu_ms_per_1000_decisions"] = 1e6 * (c1 - c0) / max(decided, 1)
                # at saturation: answers by the failure mode (the store answered all along:
                # should be 0) and shed as overloaded, next to the throughput
                r["failure_mode_answers"] = m1["failure_mode"] - m0["failure_mode"]
                r["overloaded_answers"] = m1["overloaded"] - m0["overloaded"]
                if valkey_pid:
                    r["valkey_cpu_ms_per_1000_decisions"] = \
                        1e6 * (cpu_seconds(valkey_pid) - v0) / max(decided, 1)
            samples.append(r)
    return {k: median_spread([s[k] for s in samples]) for k in samples[0]
            if isinstance(samples[0][k], (int, float))}


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
                            usage="none", direct_response=True, authz_timeout_s=1.0)
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
            for k in ("failure_mode_answers", "overloaded_answers"):  # the worst run
                if k in m:
                    row[k] = m[k]["max"]
            rows.append(row)
    res["rows"] = rows
    targets = {
        "grpc_sidecar × grpc_noop (issue 16: >= 0.75; issue 5: >= 0.90)":
            c["grpc_sidecar"]["chat_short"]["rps"]["median"] / ref_grpc,
        "http_sidecar × http_noop (issue 16: >= 0.8)":
            c["http_sidecar"]["chat_short"]["rps"]["median"] / ref_http,
        "http_sidecar × envoy_alone (issue 5: >= 0.35)":
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
             "| p50 ms | p95 ms | p99 ms | decisions/s | round trips/decision | sidecar CPU ms/1k decisions "
             "| failure-mode / shed answers (worst run) | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['profile']} | {r['rps']:.0f} ({r['rps_min']:.0f}–{r['rps_max']:.0f}) "
            f"| {r['vs_envoy_alone']:.3f} | {r['vs_noop_same_transport']:.3f} | {r['p50_ms']:.2f} "
            f"| {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r.get('decisions_per_s', float('nan')):.0f} | "
            f"{r.get('round_trips_per_decision', float('nan')):.3f} | "
            f"{r.get('cpu_ms_per_1000_decisions', float('nan')):.1f} | "
            f"{_answers(r)} | {r['errors']} |")
    fp = res.get("full_path")
    full_lines = full_path_markdown(fp, targets) if fp else []
    lines += ["", "| target | measured |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in targets.items()]
    if hl:
        lines += ["", f"Fixed rate {hl['rate']:.0f} req/s (half the fast path's max), h2load, p99 µs: "
                  + ", ".join(f"{n} {hl[n]['p99']:.0f}" for n in (
                      "envoy_alone", "http_noop", "http_sidecar", "grpc_noop", "grpc_sidecar"))
                  + "; inside the sidecar (kt_decision_latency_seconds, bucket bounds): "
                  + ", ".join(f"{n} p50 ≤ {hl[n].get('decision_p50_le_us', float('nan')):.0f}, "
                              f"p99 ≤ {hl[n].get('decision_p99_le_us', float('nan')):.0f}"
                              for n in ("http_sidecar", "grpc_sidecar"))]
    if full_lines:
        lines += [""] + full_lines
    res["markdown"] = "\n".join(lines) + "\n"


def _answers(row: dict) -> str:
    """Failure-mode and shed answers of a row ("-" where no sidecar decided)."""
    if "failure_mode_answers" not in row:
        return "-"
    return f"{row['failure_mode_answers']:.0f} / {row.get('overloaded_answers', 0):.0f}"


def full_path_markdown(fp: dict, targets: dict) -> list[str]:
    """The full-path table: each configuration against Envoy -> upstream with no kt filter
    and against the decision alone, measured in the same run."""
    cfg = fp["configs"]
    ref = cfg["path_upstream"]["mixed"]["rps"]["median"]
    decision = {p: m["rps"]["median"] for p, m in cfg["path_decision"].items()}
    up = fp["upstream_alone"]
    lines = [f"Full path (Envoy -> decision -> fake upstream -> usage; mixed: half the requests "
             f"to {FULL_HOT} hot tenants, half over {FULL_TENANTS}, half of them streamed; "
             f"hot_only: the hot tenants alone). The fake upstream alone: "
             f"{up['rps']['median']:.0f} req/s ({up['rps']['min']:.0f}–{up['rps']['max']:.0f}), "
             f"{up['upstream_cpu_ms_per_1000']['median']:.1f} ms CPU per 1,000 requests.", "",
             "| config | profile | req/s median (min–max) | × Envoy → upstream | × decision only "
             "| p50 ms | p99 ms | non-2xx | CPU ms per 1,000 req: Envoy / upstream / sidecar / "
             "Valkey | Valkey commands / script calls per request | settlements per request |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, per_profile in cfg.items():
        for profile, m in per_profile.items():
            rps = m["rps"]["median"]

            def med(k: str, m: dict = m) -> float:
                return m[k]["median"] if k in m else float("nan")

            lines.append(
                f"| {name} | {profile} | {rps:.0f} ({m['rps']['min']:.0f}–{m['rps']['max']:.0f}) "
                f"| {rps / ref:.3f} | {rps / decision[profile]:.3f} | {med('p50') / 1000:.2f} "
                f"| {med('p99') / 1000:.2f} | {m['status_errors']['max']:.0f} "
                f"| {med('envoy_cpu_ms_per_1000'):.1f} / {med('upstream_cpu_ms_per_1000'):.1f} / "
                f"{med('sidecar_cpu_ms_per_1000'):.1f} / {med('valkey_cpu_ms_per_1000'):.1f} "
                f"| {med('valkey_calls_per_request'):.3f} / "
                f"{med('valkey_script_calls_per_request'):.3f} "
                f"| {med('settlements_per_request'):.3f} |")
            if name != "path_upstream" and profile == "mixed" and name != "path_decision":
                targets[f"{name} × decision only (target >= 0.8)"] = rps / decision[profile]
                targets[f"{name} × Envoy -> upstream (target >= 0.25)"] = rps / ref
    return lines


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
    fp = res.get("full_path", {})
    if fp and fp["upstream_alone"]["requests"]["min"] <= 0:
        bad.append("upstream alone: no requests")
    for name, per_profile in fp.get("configs", {}).items():
        for profile, m in per_profile.items():
            if m["requests"]["min"] <= 0:
                bad.append(f"{name}/{profile}: no requests")
            if m["errors"]["max"] > 0:
                bad.append(f"{name}/{profile}: {m['errors']['max']} socket errors")
            if name == "path_upstream" and m["status_errors"]["max"] > 0:
                bad.append(f"{name}/{profile}: {m['status_errors']['max']} non-2xx answers")
            if name != "path_upstream" and m["decisions_per_request"]["min"] <= 0:
                bad.append(f"{name}/{profile}: the sidecar decided nothing")
            if name not in ("path_upstream", "path_decision") and \
                    m["settlements_per_request"]["min"] <= 0:
                bad.append(f"{name}/{profile}: no usage settled")
    hl = res.get("half_load_latency", {})
    for name in ("http_sidecar", "grpc_sidecar"):
        if name in hl and not hl[name].get("decision_p99_le_us", float("nan")) > 0:
            bad.append(f"half load/{name}: no decision latency recorded by the sidecar")
    return bad


if __name__ == "__main__":
    sys.exit(main())
