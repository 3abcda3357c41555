"""`kt plan` turns a bench result into cores, and says why when it cannot."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sidecar.cli import main as kt
from sidecar.plan import PlanError, plan
from tests.support.paths import ROOT



def result(tmp_path, sidecar_ms: float, valkey_ms: float | None) -> Path:
    measured = {"cpu_ms_per_1000_decisions": {"median": sidecar_ms}}
    if valkey_ms is not None:
        measured["valkey_cpu_ms_per_1000_decisions"] = {"median": valkey_ms}
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"machine": {"cpus": 2}, "configs": {
        "http_sidecar": {"chat_short": measured}}}))
    return path


def test_cores_scale_with_the_measured_cpu_per_decision(tmp_path):
    # 80 us sidecar CPU and 20 us Valkey CPU per decision, 30,000 req/s, headroom 1.5
    p = plan(result(tmp_path, 80.0, 20.0), 30_000, "http", "chat_short", 1.5)
    assert (p.sidecar_cores, p.redis_cores) == (4, 1)  # ceil(3.6), ceil(0.9)
    assert "kt serve --workers 4" in p.text()


def test_a_result_with_the_full_path_also_plans_for_settling_usage(tmp_path):
    path = result(tmp_path, 80.0, 20.0)
    doc = json.loads(path.read_text())
    # the full-path run: 240 us sidecar and 60 us Valkey per request with its usage
    # settled, 80 and 10 deciding only: settling costs 160 and 50
    doc["full_path"] = {"configs": {
        "path_als": {"mixed": {"sidecar_cpu_ms_per_1000": {"median": 240.0},
                               "valkey_cpu_ms_per_1000": {"median": 60.0}}},
        "path_decision": {"mixed": {"sidecar_cpu_ms_per_1000": {"median": 80.0},
                                    "valkey_cpu_ms_per_1000": {"median": 10.0}}}}}
    # gRPC decides dearer than the HTTP fast path (300 us): its full path is dearer too
    doc["configs"]["grpc_sidecar"] = {"chat_short": {
        "cpu_ms_per_1000_decisions": {"median": 300.0},
        "valkey_cpu_ms_per_1000_decisions": {"median": 20.0}}}
    path.write_text(json.dumps(doc))
    p = plan(path, 30_000, "http", "chat_short", 1.5)
    assert (p.full_sidecar_cores, p.full_redis_cores) == (11, 4)  # ceil(10.8), ceil(3.15)
    assert "+ 160 us sidecar and + 50 us Valkey CPU to settle" in p.text()
    assert "sidecar 240 us, Valkey 70 us per request" in p.text()
    assert "11 sidecar core(s), 4 Redis core(s)" in p.text()
    g = plan(path, 30_000, "grpc", "chat_short", 1.5)
    assert g.full_sidecar_cpu_us == 460 and g.full_sidecar_cores >= g.sidecar_cores
    assert (g.sidecar_cores, g.full_sidecar_cores) == (14, 21)  # ceil(13.5), ceil(20.7)
    # without the full path, the plan says that settling is not in it
    assert "settling usage is not included" in plan(
        result(tmp_path, 80.0, 20.0), 30_000).text()


@pytest.mark.parametrize("valkey,args,fragment", [
    (None, {}, "no Valkey CPU measurement"),
    (20.0, {"transport": "grpc"}, "no grpc_sidecar/chat_short measurement"),
    (20.0, {"headroom": 0.5}, "--headroom >= 1"),
])
def test_what_the_result_cannot_answer_is_said(tmp_path, valkey, args, fragment):
    with pytest.raises(PlanError, match=fragment.replace("/", ".")):
        plan(result(tmp_path, 80.0, valkey), 1000, **args)


def test_the_committed_bench_result_plans(capsys):
    latest = ROOT / "bench" / "results" / "latest.json"
    assert kt(["plan", "--rps", "20000", "--results", str(latest)]) == 0
    out = capsys.readouterr().out
    assert "us CPU per decision (measured)" in out and "core(s)" in out


@pytest.mark.subprocess
def test_kt_plan_works_outside_the_repository(tmp_path):
    # before: "bench/results/latest.json: not a readable bench result" anywhere but the root
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "sidecar.cli", "plan", "--rps", "5000"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "from the reference result shipped with kt-sidecar" in res.stdout
    latest = json.loads((ROOT / "bench" / "results" / "latest.json").read_text())
    measured = latest["configs"]["http_sidecar"]["chat_short"]["cpu_ms_per_1000_decisions"]
    assert f"{measured['median']:.0f} us CPU per decision" in res.stdout
    missing = subprocess.run([sys.executable, "-m", "sidecar.cli", "plan", "--rps", "5",
                              "--results", "nope.json"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and "run `python bench/run.py`" in missing.stderr
