"""The container image, without Docker (it cannot run here): the Dockerfile passes hadolint,
states what a Kubernetes pod needs (numeric user, health check, every port), builds from a
small context, and its wheel-build-and-install steps, run as written outside Docker, give
a `kt` that checks a policy and serves with the image's own arguments."""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
import venv
from pathlib import Path

import pytest

from sidecar.cli import build_parser
from tests.support.procs import find_binary, wait_until, workdir
from tests.support.paths import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if not stripped.endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def stages(text: str) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions(text):
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


@pytest.mark.subprocess
def test_hadolint_finds_nothing():
    res = subprocess.run([find_binary("hadolint"), "--failure-threshold", "info", str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_final_stage_runs_as_a_numeric_user_with_a_health_check_and_every_port():
    build, final = stages(DOCKERFILE.read_text())
    assert "gcc" in " ".join(a for _, a in build) and "gcc" not in " ".join(a for _, a in final)
    final_ins = dict((w, a) for w, a in final)
    assert re.fullmatch(r"\d+:\d+", final_ins["USER"])  # runAsNonRoot can check a number
    assert "/healthz" in final_ins["HEALTHCHECK"]
    entrypoint, cmd = json.loads(final_ins["ENTRYPOINT"]), json.loads(final_ins["CMD"])
    assert entrypoint == ["kt", "serve"]
    args = build_parser().parse_args(["serve", *cmd])
    ports = {int(a.rsplit(":", 1)[1]) for a in (args.grpc, args.http, args.http_authz,
                                                 args.admin)}
    assert ports <= {int(p) for p in final_ins["EXPOSE"].split()}
    assert args.http.startswith("0.0.0.0:")  # probes and scrapes come from outside the pod
    # what writes the books or asks for decisions stays on loopback without a credential
    assert all(a.startswith("127.0.0.1:") for a in (args.grpc, args.http_authz, args.admin))


def context_files(root: Path) -> list[str]:
    """The build context `docker build .` sends, by .dockerignore's rules (last match wins,
    `!` lets a path back in, a directory's rule applies to what is under it)."""
    rules = [line.strip() for line in (root / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]

    def excluded(rel: str) -> bool:
        out = False
        parts = rel.split("/")
        for rule in rules:
            neg = rule.startswith("!")
            pat = rule[1:] if neg else rule
            pat = pat.rstrip("/")
            prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
            hit = any(fnmatch.fnmatch(p, pat) or (pat.startswith("**/") and (
                fnmatch.fnmatch(p, pat[3:]) or fnmatch.fnmatch(p.rsplit("/", 1)[-1], pat[3:])))
                for p in prefixes)
            if hit:
                out = not neg
        return out

    readmits = [rule[1:].rstrip("/").split("/") for rule in rules if rule.startswith("!")]

    def could_readmit_under(rel: str) -> bool:
        """A `!` rule could let back in something under this excluded directory."""
        parts = rel.split("/")
        return any(r[0].startswith("**") or (len(r) > len(parts) - 1 and all(
            fnmatch.fnmatch(p, q) for p, q in zip(parts, r, strict=False))) for r in readmits)

    # walked as Docker walks the context: an excluded directory no `!` rule reaches into is
    # not entered (.venv and .git alone are tens of thousands of files)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if base == "." else base + "/"
        dirnames[:] = [d for d in dirnames
                       if not excluded(prefix + d) or could_readmit_under(prefix + d)]
        files += [prefix + f for f in filenames if not excluded(prefix + f)]
    return sorted(files)


def test_the_build_context_is_the_sources_only():
    files = context_files(ROOT)
    assert {"pyproject.toml", "setup.py", "constraints.txt", "native/core.pyx",
            "sidecar/cli.py", "proto/usage.proto", "bench/results/latest.json"} <= set(files)
    assert not [f for f in files if f.split("/")[0] in (".venv", ".git", "build", "tests", "docs")]
    assert not [f for f in files if f.endswith((".so", ".pyc"))]
    assert sum((ROOT / f).stat().st_size for f in files) < 2_000_000


def _pip_steps(stage: list[tuple[str, str]]) -> list[str]:
    return [cmd.strip() for w, a in stage if w == "RUN" for cmd in a.split("&&")
            if cmd.strip().startswith("pip ")]


def _env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for w, a in stage:
        if w == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(a))
    return env


@pytest.mark.subprocess
def test_the_images_build_steps_outside_docker_give_a_working_kt(tmp_path):
    build, final = stages(DOCKERFILE.read_text())
    build_steps, install_steps = _pip_steps(build), _pip_steps(final)
    assert build_steps == ["pip wheel --wheel-dir /wheels ."]
    assert install_steps == ["pip install --no-index --find-links /wheels /wheels/kt_sidecar-*.whl"]
    # the build context as Docker would send it, at /src
    src, wheels = tmp_path / "src", tmp_path / "wheels"
    for rel in context_files(ROOT):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    env = dict(os.environ)
    env.update({k: v.replace("/src", str(src)) for k, v in _env(build).items()})
    assert env["PIP_CONSTRAINT"] == str(src / "constraints.txt")
    for step in build_steps:
        cmd = [sys.executable, "-m", *shlex.split(step.replace("/wheels", str(wheels)))]
        res = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # every wheel is at the version constraints.txt names (the build used the pins)
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "_", name.strip().lower())] = version.strip()
    for whl in wheels.glob("*.whl"):
        name, version = whl.name.split("-")[:2]
        if name.lower() != "kt_sidecar":
            assert pins.get(name.lower()) == version, f"{whl.name} is not pinned in constraints.txt"
    # a fresh environment with the image's install step: wheels only, no index
    image = tmp_path / "image"
    venv.create(image, with_pip=True)
    env = dict(os.environ, **{k: v for k, v in _env(final).items()})
    for step in install_steps:
        args = shlex.split(step.replace("/wheels", str(wheels)))
        args = [str(p) for a in args for p in (sorted(wheels.glob(Path(a).name))
                                               if "*" in a else [a])]
        res = subprocess.run([str(image / "bin" / "python"), "-m", *args], env=env,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    kt = str(image / "bin" / "kt")
    sample = subprocess.run([kt, "check-config", str(ROOT / "sidecar" / "samples" / "policy.yaml")],
                            capture_output=True, text=True, timeout=60)
    assert sample.returncode == 0 and ": ok (" in sample.stdout, sample.stderr
    # kt serve with the image's CMD, its ports made ephemeral and its files here
    cmd = json.loads(dict(final)["CMD"])
    with workdir() as d:
        policy = d / "policy.yaml"
        shutil.copy(ROOT / "sidecar" / "samples" / "policy.yaml", policy)
        args = [a.replace("/etc/kt/policy.yaml", str(policy))
                 .replace("/var/lib/kt/spend.json", str(d / "spend.json")) for a in cmd]
        args = [re.sub(r"^(0\.0\.0\.0|127\.0\.0\.1):\d+$", "127.0.0.1:0", a) for a in args]
        ready = d / "ready.json"
        log = d / "serve.log"
        with open(log, "w") as out:
            # the admin port's default (127.0.0.1:9091) is free in a container, not here
            proc = subprocess.Popen([kt, "serve", *args, "--admin", "127.0.0.1:0",
                                     "--ready-file", str(ready)],
                                    cwd=d, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: proc.poll() is None and ready.exists(), 30, "kt serve", log)
            port = json.loads(ready.read_text())["http_port"]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
                assert r.status == 200
            # the image's HEALTHCHECK command, pointed at this port
            check = json.loads(dict(final)["HEALTHCHECK"].split("CMD", 1)[1])
            check = [c.replace("127.0.0.1:9090", f"127.0.0.1:{port}") for c in check]
            check[0] = str(image / "bin" / "python")
            assert subprocess.run(check, timeout=30).returncode == 0
        finally:
            proc.terminate()
            proc.wait(10)
