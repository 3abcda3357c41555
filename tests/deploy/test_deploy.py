"""The deployment files work as written: the Kubernetes gateway (validated offline against
the Kubernetes schemas, its policy by `kt check-config`, its Envoy config by Envoy, and its
two processes run here with the manifest's arguments and files), the Istio resources, and
the operator mistakes `kt serve` answers in one line."""
from __future__ import annotations

import contextlib
import json
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

import kubernetes_validate
import pytest
import yaml

from sidecar.cli import build_parser
from tests.support.procs import (LOOPBACK, find_binary, free_port, log_tail, stop_process,
                                 wait_until, workdir)
from tests.support.jwt import rs256_keys, rs256_token
from tests.support.upstream import FakeUpstream
from tests.support.valkey import Valkey
from tests.support.paths import ROOT

DEPLOY = ROOT / "docs" / "deploy"
K8S = DEPLOY / "kubernetes"
KUBERNETES_VERSION = "1.37.0"  # the schemas kubernetes-validate ships (strict: no unknown field)


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomize_configmaps() -> list[dict]:
    """The ConfigMaps kustomization.yaml generates (`kubectl apply -k` does the same)."""
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [{"apiVersion": "v1", "kind": "ConfigMap",
             "metadata": {"name": gen["name"], "namespace": kust["namespace"]},
             "data": {Path(f).name: (K8S / f).read_text() for f in gen["files"]}}
            for gen in kust["configMapGenerator"]]


def strict_validate(doc: dict) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def gateway() -> dict[str, dict]:
    return {d["kind"]: d for d in load_docs(K8S / "gateway.yaml")}


def pod_spec() -> dict:
    return gateway()["Deployment"]["spec"]["template"]["spec"]


def container(name: str) -> dict:
    spec = pod_spec()
    return next(c for c in spec["containers"] + spec.get("initContainers", [])
                if c["name"] == name)


def test_every_kubernetes_document_passes_the_schemas_in_strict_mode():
    checked = []
    for doc in load_docs(K8S / "gateway.yaml") + kustomize_configmaps():
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            # the Prometheus Operator's CRD, by the model generated from its schema
            from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

            dumped = ServiceMonitor.model_validate(doc).model_dump(
                by_alias=True, exclude_unset=True, mode="json")
            assert dumped == doc  # nothing the schema lacks
        else:
            strict_validate(doc)
        checked.append(doc["kind"])
    assert sorted(checked) == ["ConfigMap", "ConfigMap", "Deployment",
                               "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service",
                               "ServiceAccount", "ServiceMonitor"]


def test_strict_validation_would_catch_a_misspelled_field():
    # the control for the test above: the schemas really are strict
    deployment = gateway()["Deployment"]
    deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonroot"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        strict_validate(deployment)


def test_the_pod_is_non_root_read_only_and_unprivileged_with_real_probes():
    spec = pod_spec()
    assert spec["securityContext"]["runAsNonRoot"] is True
    for name in ("kt-sidecar", "envoy"):
        c = container(name)
        sc = c["securityContext"]
        assert isinstance(sc["runAsUser"], int) and sc["runAsUser"] > 0
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
    kt = container("kt-sidecar")
    assert kt["restartPolicy"] == "Always"  # a native sidecar: up before Envoy, down after
    args = build_parser().parse_args(["serve", *kt["args"]])
    ports = {p["name"]: p["containerPort"] for p in kt["ports"]}
    assert ports["metrics"] == int(args.http.rsplit(":", 1)[1])
    assert args.http.startswith("0.0.0.0:") and args.grpc.startswith("127.0.0.1:")
    assert args.admin.startswith("127.0.0.1:")  # the books' write API: loopback, no token
    assert kt["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert kt["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    # the image's numeric user (Dockerfile USER) is the one the pod asserts
    user = re.search(r"^USER (\d+):(\d+)$", (K8S.parent.parent.parent / "Dockerfile").read_text(),
                     re.M)
    assert user and kt["securityContext"]["runAsUser"] == int(user.group(1))


def test_every_container_can_read_the_files_it_mounts():
    # How the kubelet writes a Secret or ConfigMap volume (no cluster here to run it):
    # files owned by root, group root, or the pod's fsGroup when it has one, with the
    # volume's defaultMode (0644 unless given). Envoy (user 101) reads the provider keys
    # at start; without the group, a 0440 Secret file would stop it ("cannot read")
    spec = pod_spec()
    volumes = {v["name"]: v for v in spec["volumes"]}
    fs_group = spec["securityContext"].get("fsGroup")
    for c in spec["containers"] + spec.get("initContainers", []):
        uid, gid = c["securityContext"]["runAsUser"], c["securityContext"]["runAsGroup"]
        groups = {gid} | ({fs_group} if fs_group is not None else set())
        for mount in c.get("volumeMounts", []):
            vol = volumes[mount["name"]]
            source = vol.get("secret") or vol.get("configMap")
            if source is None:
                continue  # emptyDir: writable by everyone in the pod
            mode = source.get("defaultMode", 0o644)
            owner_group = fs_group if fs_group is not None else 0
            readable = (mode & 0o004) or (mode & 0o040 and owner_group in groups) or (
                mode & 0o400 and uid == 0)
            assert readable, f"{c['name']} (uid {uid}) cannot read {mount['mountPath']}"
    # and the keys are not world-readable
    keys = volumes["provider-keys"]["secret"]
    assert keys["defaultMode"] & 0o007 == 0


def test_services_monitors_budgets_and_autoscaler_point_at_the_pod():
    g = gateway()
    labels = g["Deployment"]["spec"]["template"]["metadata"]["labels"]
    named_ports = {p["name"] for c in pod_spec()["containers"] + pod_spec()["initContainers"]
                   for p in c.get("ports", [])}
    assert g["Service"]["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in g["Service"]["spec"]["ports"]} <= named_ports
    assert g["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert g["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == \
        g["Deployment"]["metadata"]["name"]
    metrics = [m.get("pods", {}).get("metric", {}).get("name")
               for m in g["HorizontalPodAutoscaler"]["spec"]["metrics"]]
    assert "kt_request_queue_depth" in metrics
    # the ServiceMonitor selects the Service by its labels, by a port it names
    sm = g["ServiceMonitor"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= \
        g["Service"]["metadata"]["labels"].items()
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= \
        {p["name"] for p in g["Service"]["spec"]["ports"]}
    # every mount has its volume and every volume a source the kustomization or docs create
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    for c in pod_spec()["containers"] + pod_spec()["initContainers"]:
        assert {m["name"] for m in c["volumeMounts"]} <= set(volumes)
    generated = {cm["metadata"]["name"] for cm in kustomize_configmaps()}
    referenced = {v["configMap"]["name"] for v in volumes.values() if "configMap" in v}
    assert referenced - generated == {"llm-gateway-jwks"}  # made by hand (kustomization.yaml)


@pytest.mark.subprocess
def test_the_embedded_policy_passes_kt_check_config():
    res = subprocess.run([sys.executable, "-m", "sidecar.cli", "check-config",
                          str(K8S / "policy.yaml")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "2 tenants, 2 tiers, backend RedisBackend" in res.stdout


def envoy_command() -> list[str]:
    first = (K8S / "envoy.yaml").read_text().splitlines()[0]
    m = re.fullmatch(r"# Generated, do not edit: cd docs/deploy/kubernetes && (kt envoy-config .*)"
                     r" > envoy.yaml", first)
    assert m, first
    return shlex.split(m.group(1))


@pytest.mark.envoy
def test_the_embedded_envoy_config_is_what_kt_envoy_config_prints_and_envoy_accepts(tmp_path):
    cmd = envoy_command()
    res = subprocess.run([sys.executable, "-m", "sidecar.cli", *cmd[1:]], cwd=K8S,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    text = (K8S / "envoy.yaml").read_text()
    assert text.split("\n", 1)[1] == res.stdout, "regenerate envoy.yaml with its first line"
    # Envoy reads the files it names at start: give it the mounted ones here
    files = mounted_files(tmp_path, api_key="sk-validate", jwks=rs256_keys()[1])
    (tmp_path / "envoy.yaml").write_text(yaml.safe_dump(rewrite(yaml.safe_load(text), files)))
    out = subprocess.run([find_binary("envoy"), "--mode", "validate", "-c",
                          str(tmp_path / "envoy.yaml"), "--log-level", "warning"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "eprecated" not in out.stdout + out.stderr


# --- the pod's two processes, run here as the manifest starts them -------------------------

def mounted_files(d: Path, api_key: str, jwks: dict) -> dict[str, str]:
    """Where each file the pod mounts lands here: the mount path, moved under `d`."""
    files = {}
    for volume, mount_path, name, content in [
            ("policy", "/etc/kt", "policy.yaml", (K8S / "policy.yaml").read_text()),
            ("envoy-config", "/etc/envoy", "envoy.yaml", (K8S / "envoy.yaml").read_text()),
            ("provider-keys", "/var/run/secrets/llm-providers", "openai-api-key", api_key),
            ("jwks", "/etc/gateway-jwks", "jwks.json", json.dumps(jwks))]:
        mounts = [m for c in pod_spec()["containers"] + pod_spec()["initContainers"]
                  for m in c["volumeMounts"] if m["name"] == volume]
        assert mounts and all(m["mountPath"] == mount_path for m in mounts)
        local = d / mount_path.lstrip("/") / name
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(content)
        files[f"{mount_path}/{name}"] = str(local)
    return files


def rewrite(node: Any, strings: dict[str, str], addresses: Optional[dict] = None) -> Any:
    """The same document with file paths and socket addresses replaced (nothing else)."""
    if isinstance(node, dict):
        sa = node.get("socket_address")
        if addresses and isinstance(sa, dict):
            key = (sa["address"], sa["port_value"])
            if key in addresses:
                host, port = addresses[key]
                node = dict(node, socket_address={"address": host, "port_value": port})
        return {k: (v if k == "socket_address" and addresses and isinstance(v, dict)
                                 and (v.get("address"), v.get("port_value")) not in addresses
                    else rewrite(v, strings, addresses)) for k, v in node.items()}
    if isinstance(node, list):
        return [rewrite(v, strings, addresses) for v in node]
    if isinstance(node, str):
        return strings.get(node, node)
    return node


@pytest.mark.envoy
@pytest.mark.valkey
def test_the_gateway_pod_runs_here_as_written_and_serves_a_request():
    import trustme

    kt_args = container("kt-sidecar")["args"]
    envoy = container("envoy")
    issuer = envoy_command()[envoy_command().index("--jwt-issuer") + 1]
    ca = trustme.CA()
    key, jwks = rs256_keys()
    with workdir() as d, Valkey(d) as valkey, FakeUpstream(
            "openai", ssl_context=_tls_context(ca, "api.openai.com")) as provider:
        files = mounted_files(d, api_key="sk-gateway-key", jwks=jwks)
        (d / "ca.pem").write_bytes(ca.cert_pem.bytes())
        # the policy as mounted, with Redis here instead of the cluster's service name, and
        # a Redis timeout this shared 2-core machine can keep under load (15 ms in the pod)
        policy = Path(files["/etc/kt/policy.yaml"])
        text = policy.read_text()
        backend = yaml.safe_load(text)["backend"]
        text = text.replace(backend["url"], valkey.url)
        policy.write_text(text.replace(f"timeout_ms: {backend['timeout_ms']}", "timeout_ms: 250"))
        assert yaml.safe_load(policy.read_text())["backend"]["timeout_ms"] == 250
        # kt-sidecar: the container's args after the image's `kt serve`, its files here and
        # its ports any free ones (other tests share this machine)
        ready = d / "kt-ready.json"
        args = [files.get(a, a) for a in kt_args]
        args = [re.sub(r"^(0\.0\.0\.0|127\.0\.0\.1):\d+$", f"{LOOPBACK}:0", a) for a in args]
        if "--admin" not in args:  # its default, 127.0.0.1:9091, is free in the pod, not here
            args += ["--admin", f"{LOOPBACK}:0"]
        log = d / "kt.log"
        with open(log, "wb") as out:
            kt = subprocess.Popen([sys.executable, "-m", "sidecar.cli", "serve", *args,
                                   "--ready-file", str(ready)], stdout=out,
                                  stderr=subprocess.STDOUT, cwd=d)
        try:
            wait_until(lambda: kt.poll() is None and ready.exists(), 60, "kt-sidecar", log)
            ports = json.loads(ready.read_text())
            probe = container("kt-sidecar")["readinessProbe"]["httpGet"]["path"]
            wait_until(lambda: _get(ports["http_port"], probe)[0] == 200, 60, "readyz", log)
            # Envoy: the container's command and args, with the mounted files here; the
            # listener, admin and sidecar ports moved to free ones, api.openai.com resolved
            # to this machine (its certificate, SNI and Host stay api.openai.com)
            listen, admin = free_port(), free_port()
            doc = yaml.safe_load(Path(files["/etc/envoy/envoy.yaml"]).read_text())
            strings = dict(files, **{"/etc/ssl/certs/ca-certificates.crt": str(d / "ca.pem")})
            doc = rewrite(doc, strings, {
                ("0.0.0.0", 10000): (LOOPBACK, listen),
                ("127.0.0.1", 9901): (LOOPBACK, admin),
                ("127.0.0.1", 8081): (LOOPBACK, ports["grpc_port"]),
                ("api.openai.com", 443): ("localhost", provider.port)})
            Path(files["/etc/envoy/envoy.yaml"]).write_text(yaml.safe_dump(doc, sort_keys=False))
            envoy_args = [files.get(a, a) for a in envoy["args"]]
            envoy_log = d / "envoy.log"
            with open(envoy_log, "wb") as out:
                proxy = subprocess.Popen([find_binary(envoy["command"][0]), *envoy_args],
                                         stdout=out, stderr=subprocess.STDOUT, cwd=d)
            try:
                wait_until(lambda: proxy.poll() is None and _tcp(listen), 30, "envoy", envoy_log)
                token = rs256_token(key, {"iss": issuer, "org": "acme",
                                          "exp": int(time.time()) + 600})
                status, body = _chat(listen, {"authorization": f"Bearer {token}"})
                assert status == 200, body + log_tail(envoy_log) + log_tail(log)
                got = provider.requests[-1]["headers"]
                assert got["authorization"] == "Bearer sk-gateway-key"  # the pod's Secret
                assert got["host"] == "api.openai.com" and got["x-kt-tenant"] == "acme"
                # no token, or a token of a tenant the policy does not know: refused
                assert _chat(listen, {"x-tenant-id": "acme"})[0] == 401
                stranger = rs256_token(key, {"iss": issuer, "org": "stranger",
                                             "exp": int(time.time()) + 600})
                assert _chat(listen, {"authorization": f"Bearer {stranger}"})[0] == 403
                assert len(provider.requests) == 1
                metrics = _get(ports["http_port"], "/metrics")[1]
                allowed = [line for line in metrics.splitlines()
                           if line.startswith('kt_requests_total{decision="allow"')]
                assert allowed and float(allowed[0].rsplit(" ", 1)[1]) == 1.0, allowed
                # the metric the HPA scales on is there, once for the pod (the workers' sum)
                hpa = gateway()["HorizontalPodAutoscaler"]["spec"]["metrics"]
                name = next(m["pods"]["metric"]["name"] for m in hpa if m["type"] == "Pods")
                depth = [line for line in metrics.splitlines() if line.startswith(name + " ")]
                assert depth == [f"{name} 0.0"], depth
            finally:
                stop_process(proxy)
        finally:
            stop_process(kt)


def _tls_context(ca: Any, hostname: str):
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(hostname).configure_cert(ctx)
    return ctx


def _tcp(port: int) -> bool:
    with socket.create_connection((LOOPBACK, port), timeout=1):
        return True


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _chat(port: int, headers: dict) -> tuple[int, str]:
    body = json.dumps({"model": "gpt-4o", "max_tokens": 20,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    req = urllib.request.Request(f"http://{LOOPBACK}:{port}/v1/chat/completions", data=body,
                                 headers={"content-type": "application/json", **headers},
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# --- Istio ---------------------------------------------------------------------------------

ISTIO = DEPLOY / "istio"
# Istio's own kinds, by the pydantic models of its CRDs (cloudcoil-models-istio, generated from
# the CRD schemas): a document must come back unchanged from model and dump, so a misspelled
# or unknown field (which the model would drop) fails, as would a wrong type
ISTIO_MODELS = {"networking.istio.io/v1": "cloudcoil.models.istio.networking.v1",
                "networking.istio.io/v1alpha3": "cloudcoil.models.istio.networking.v1alpha3",
                "security.istio.io/v1": "cloudcoil.models.istio.security.v1"}
CORE_GROUPS = ("v1", "apps/v1", "policy/v1", "autoscaling/v2")
# the extension provider's fields in istio.mesh.v1alpha1 (MeshConfig.ExtensionProvider.
# EnvoyExternalAuthorizationGrpcProvider), for the IstioOperator no offline schema covers
GRPC_PROVIDER_FIELDS = {"service", "port", "timeout", "failOpen", "clearRouteCache",
                        "statusOnError", "includeRequestBodyInCheck"}
REQUEST_BODY_FIELDS = {"maxRequestBytes", "allowPartialMessage", "packAsBytes"}


def istio_docs() -> list[dict]:
    return [d for f in sorted(ISTIO.glob("*.yaml")) for d in load_docs(f)]


def istio_model_check(doc: dict) -> None:
    import importlib

    cls = getattr(importlib.import_module(ISTIO_MODELS[doc["apiVersion"]]), doc["kind"])
    dumped = cls.model_validate(doc).model_dump(by_alias=True, exclude_unset=True, mode="json")
    assert dumped == doc, f"{doc['kind']} {doc['metadata']['name']}: fields the schema lacks"


def test_every_istio_document_is_checked_by_the_schema_that_covers_it():
    checked: dict[str, list[str]] = {"kubernetes": [], "istio": [], "structure": []}
    for doc in istio_docs():
        if doc["apiVersion"] in CORE_GROUPS:
            strict_validate(doc)
            checked["kubernetes"].append(doc["kind"])
        elif doc["apiVersion"] in ISTIO_MODELS:
            istio_model_check(doc)
            checked["istio"].append(doc["kind"])
        else:
            checked["structure"].append(doc["kind"])
    assert sorted(checked["kubernetes"]) == ["ConfigMap", "Deployment", "Service",
                                             "ServiceAccount"]
    assert sorted(checked["istio"]) == [
        "AuthorizationPolicy", "AuthorizationPolicy", "AuthorizationPolicy", "DestinationRule",
        "EnvoyFilter", "Gateway", "PeerAuthentication", "RequestAuthentication",
        "ServiceEntry", "Sidecar", "VirtualService"]
    assert checked["structure"] == ["IstioOperator"]  # see below


def test_the_istio_model_check_would_catch_a_misspelled_field():
    policy = next(d for d in istio_docs() if d["kind"] == "AuthorizationPolicy")
    policy["spec"]["actoin"] = policy["spec"].pop("action")
    with pytest.raises(AssertionError, match="fields the schema lacks"):
        istio_model_check(policy)


def test_the_provider_the_policy_names_is_the_service_kt_sidecar_serves():
    docs = istio_docs()
    operator = next(d for d in docs if d["kind"] == "IstioOperator")
    (provider,) = operator["spec"]["meshConfig"]["extensionProviders"]
    grpc = provider["envoyExtAuthzGrpc"]
    assert set(grpc) <= GRPC_PROVIDER_FIELDS
    assert set(grpc["includeRequestBodyInCheck"]) <= REQUEST_BODY_FIELDS
    custom = [d for d in docs if d["kind"] == "AuthorizationPolicy"
              and d["spec"].get("action") == "CUSTOM"]
    assert [p["spec"]["provider"]["name"] for p in custom] == [provider["name"]]
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"]
                   == grpc["service"].split(".")[0])
    assert grpc["service"] == (f"{service['metadata']['name']}."
                               f"{service['metadata']['namespace']}.svc.cluster.local")
    port = next(p for p in service["spec"]["ports"] if p["port"] == grpc["port"])
    assert port.get("appProtocol") == "grpc"
    # the app listens where the Sidecar resource delivers the port's calls
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    (kt,) = deployment["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(["serve", *kt["args"]])
    sidecar = next(d for d in docs if d["kind"] == "Sidecar")
    ingress = {i["port"]["number"]: i["defaultEndpoint"] for i in sidecar["spec"]["ingress"]}
    assert ingress[grpc["port"]] == args.grpc
    policy = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["policy.yaml"]
    assert "tenant: {header: x-tenant-id" in policy
    jwt = next(d for d in docs if d["kind"] == "RequestAuthentication")
    assert {"header": "x-tenant-id", "claim": "org"} in \
        jwt["spec"]["jwtRules"][0]["outputClaimToHeaders"]
    # the EnvoyFilter's ext_proc calls the same Service, by Istio's cluster name for it
    envoy_filter = next(d for d in docs if d["kind"] == "EnvoyFilter")
    ext_proc = envoy_filter["spec"]["configPatches"][1]["patch"]["value"]
    assert ext_proc["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == \
        f"outbound|{grpc['port']}||{grpc['service']}"


@pytest.mark.subprocess
def test_the_istio_policy_passes_kt_check_config(tmp_path):
    cm = next(d for d in istio_docs() if d["kind"] == "ConfigMap")
    (tmp_path / "policy.yaml").write_text(cm["data"]["policy.yaml"])
    res = subprocess.run([sys.executable, "-m", "sidecar.cli", "check-config",
                          str(tmp_path / "policy.yaml")], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr


def istio_gateway_bootstrap(tiers: list, listen_port: int = 10000, admin_port: int = 9901,
                            ext_proc: bool = True) -> tuple[dict, dict]:
    """A bootstrap standing in for the ingress gateway's Envoy, with the EnvoyFilter's patches
    applied as Istio applies them: the connection manager's typed_config MERGEd (a list
    field appended to), ext_proc inserted before the router. The gateway's own connection
    manager has no early header mutation: kt envoy-config's is removed first, so what is
    stripped is the EnvoyFilter's doing. Returns the bootstrap and the EnvoyFilter."""
    from sidecar.envoy_config import EnvoyOptions, bootstrap

    envoy_filter = next(d for d in istio_docs() if d["kind"] == "EnvoyFilter")
    merge, insert = (p["patch"] for p in envoy_filter["spec"]["configPatches"])
    assert (merge["operation"], insert["operation"]) == ("MERGE", "INSERT_BEFORE")
    doc = bootstrap(EnvoyOptions(mode="none", tiers=tiers, listen_port=listen_port,
                                 admin_port=admin_port))
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    del hcm["early_header_mutation_extensions"]
    patch = dict(merge["value"]["typed_config"])
    assert patch.pop("@type") == hcm["@type"]
    for key, value in patch.items():
        if isinstance(value, list):
            hcm.setdefault(key, []).extend(value)
        else:
            hcm[key] = value
    if ext_proc:
        ext = insert["value"]
        hcm["http_filters"] = [ext] + hcm["http_filters"]  # mode none: the router alone
        cluster = ext["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
        kt = json.loads(json.dumps(doc["static_resources"]["clusters"][0]))
        kt["name"] = kt["load_assignment"]["cluster_name"] = cluster
        doc["static_resources"]["clusters"].append(kt)
    return doc, envoy_filter


@pytest.mark.envoy
def test_the_envoy_filter_patches_are_filters_envoy_accepts(tmp_path):
    # The patch values are Envoy config, which no Istio schema checks: put them in a
    # bootstrap (with a cluster of the name Istio gives the Service) as the patches place
    # them, and let Envoy validate them
    from sidecar import contract
    from sidecar.envoy_config import TierRoute
    from sidecar.policy.load import load_policy

    doc, envoy_filter = istio_gateway_bootstrap([TierRoute("default", "m", "127.0.0.1:1")])
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = subprocess.run([find_binary("envoy"), "--mode", "validate", "-c", str(path),
                          "--log-level", "warning"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "eprecated" not in out.stdout + out.stderr
    # it strips what kt envoy-config strips: the decision's headers, the estimate, end-user
    # and tags headers (the policy does not trust them), the client's request id; and the tenant header
    # RequestAuthentication writes
    (early,) = envoy_filter["spec"]["configPatches"][0]["patch"]["value"]["typed_config"][
        "early_header_mutation_extensions"]
    removed = [m["remove"] for m in early["typed_config"]["mutations"]]
    cm = next(d for d in istio_docs() if d["kind"] == "ConfigMap")
    (tmp_path / "policy.yaml").write_text(cm["data"]["policy.yaml"])
    policy = load_policy(str(tmp_path / "policy.yaml"))
    assert not policy.estimate.trusted
    tenant = next(d for d in istio_docs() if d["kind"] == "RequestAuthentication")[
        "spec"]["jwtRules"][0]["outputClaimToHeaders"][0]["header"]
    assert not policy.attribution.trusted  # nor its end user and tags
    assert removed == [*contract.UPSTREAM_HEADERS, policy.estimate.header,
                       policy.attribution.user_header, policy.attribution.tags_header,
                       "x-request-id", tenant]


@pytest.mark.envoy
def test_the_envoy_filter_strips_what_a_client_must_not_set():
    # through a real Envoy with the patches applied: a client's decision headers (one of
    # which would pick the compact route), its estimate, its request id and its tenant do
    # not reach the upstream; Envoy makes a request id of its own
    from sidecar.envoy_config import TierRoute

    with FakeUpstream("default") as default, FakeUpstream("compact") as compact, \
            workdir() as d:
        admin, listen = free_port(), free_port()
        doc, _ = istio_gateway_bootstrap(
            [TierRoute("default", "gpt-4o", default.address),
             TierRoute("compact", "gpt-4o-mini", compact.address)], listen, admin,
            ext_proc=False)  # no sidecar here: the header mutation is the subject
        from tests.support.procs import EnvoyProcess

        forged = {"x-kt-tier": "compact", "x-kt-decision": "allow", "x-kt-reservation": "r-1",
                  "x-kt-provider": "openai", "x-kt-estimated-tokens": "0",
                  "x-request-id": "client-chosen-id", "x-tenant-id": "someone-else"}
        with EnvoyProcess(yaml.safe_dump(doc), d, admin, listen) as envoy:
            req = urllib.request.Request(envoy.url(), data=b"{}", headers={
                "content-type": "application/json", **forged})
            with urllib.request.urlopen(req, timeout=10) as resp:
                reply = json.load(resp)
        assert reply["served_by"] == "default" and not compact.requests
        got = reply["received_headers"]
        assert not (set(forged) - {"x-request-id"}) & set(got), got
        assert got["x-request-id"] and got["x-request-id"] != "client-chosen-id"


# --- operator mistakes: one clear line, a non-zero exit, never a traceback ----------------

@contextlib.contextmanager
def occupied_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield f"127.0.0.1:{s.getsockname()[1]}"


def kt_serve(*args: str, policy: Optional[Path] = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sidecar.cli", "serve", "--grpc", "127.0.0.1:0",
           "--http", "127.0.0.1:0", "--admin", "127.0.0.1:0", *args]
    if policy is not None:
        cmd += ["--config", str(policy)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def one_line(res: subprocess.CompletedProcess, code: int, expected: str) -> None:
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr == f"kt serve: {expected}\n"


@pytest.mark.subprocess
@pytest.mark.parametrize("flag", ["--grpc", "--http", "--http-authz"])
def test_a_port_in_use_is_named_in_one_line(flag):
    with occupied_port() as addr:
        res = kt_serve(flag, addr)
    one_line(res, 4, f"cannot listen on {addr} ({flag}): Address already in use")


@pytest.mark.subprocess
def test_an_address_not_on_this_host_is_named_in_one_line(tmp_path):
    token = tmp_path / "grpc.token"  # beyond loopback, a listener needs a credential
    token.write_text("a-token-of-sixteen-or-more\n")
    res = kt_serve("--grpc", "192.0.2.1:8081",  # TEST-NET-1: never a local address
                   "--grpc-token-file", str(token))
    one_line(res, 4, "cannot listen on 192.0.2.1:8081 (--grpc): Cannot assign requested address")


@pytest.mark.subprocess
@pytest.mark.parametrize("flag,value,expected", [
    ("--grpc", "127.0.0.1:notaport", "--grpc '127.0.0.1:notaport': the port must be a number "
                                      "from 0 to 65535"),
    ("--http", "9090", "--http '9090': expected HOST:PORT"),
    ("--http-authz", "localhost:99999", "--http-authz 'localhost:99999': the port must be a "
                                         "number from 0 to 65535"),
])
def test_a_malformed_address_is_named_in_one_line(flag, value, expected):
    one_line(kt_serve(flag, value), 2, expected)


@pytest.mark.valkey
def test_with_workers_a_port_in_use_is_still_one_line(tmp_path):
    with workdir() as d, Valkey(d) as v:
        policy = d / "policy.yaml"
        policy.write_text("tiers: [{name: default, model: gpt-4o}]\n"
                          f'backend: {{kind: redis, url: "{v.url}"}}\n')
        with occupied_port() as addr:
            grpc_res = kt_serve("--workers", "2", "--grpc", addr, policy=policy)
            http_res = kt_serve("--workers", "2", "--http", addr, policy=policy)
    one_line(grpc_res, 4, f"cannot listen on {addr} (--grpc): Address already in use")
    one_line(http_res, 4, f"cannot listen on {addr} (--http): Address already in use")


# --- the README's deploy section, run as written -------------------------------------------

README = ROOT / "README.md"


def readme_deploy_commands() -> list[str]:
    text = README.read_text().split("## Deploy: a gateway in front of a real provider", 1)[1]
    block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    commands, current = [], ""
    for line in block.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            commands.append(current.strip())
            current = ""
    return commands


@pytest.mark.envoy
def test_the_readme_deploy_section_works_as_written():
    """The README's commands, in order, on this machine: only the ports (other tests share
    it) and the provider's address and CA bundle differ. api.openai.com stays the name Envoy
    asks for in TLS (SNI), checks in the certificate and sends as Host; it connects to a TLS
    fake provider at `localhost` (a name that resolves here) whose certificate a test CA
    signed for api.openai.com."""
    import trustme

    key_cmd, serve_cmd, config_cmd, envoy_cmd, curl_cmd = readme_deploy_commands()
    assert serve_cmd == "kt serve &" and envoy_cmd == "envoy -c envoy.yaml &"
    assert config_cmd.startswith("kt envoy-config ") and config_cmd.endswith("> envoy.yaml")
    ca = trustme.CA()
    bin_dir = str(Path(sys.executable).parent)
    with workdir() as d, FakeUpstream("openai", ssl_context=_tls_context(
            ca, "api.openai.com")) as provider:
        env = dict(__import__("os").environ, PATH=f"{bin_dir}:/usr/bin:/bin",
                   OPENAI_API_KEY="sk-readme-key", PWD=str(d))
        subprocess.run(["bash", "-c", key_cmd], cwd=d, env=env, check=True, timeout=30)
        assert (d / "openai.key").stat().st_mode & 0o077 == 0  # readable by its owner only
        ready, log = d / "ready.json", d / "kt.log"
        with open(log, "wb") as out:  # `kt serve`, on free ports
            kt = subprocess.Popen([sys.executable, "-m", "sidecar.cli", "serve", "--grpc",
                                   f"{LOOPBACK}:0", "--http", f"{LOOPBACK}:0", "--admin",
                                   f"{LOOPBACK}:0", "--ready-file", str(ready)], cwd=d,
                                  stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: kt.poll() is None and ready.exists(), 30, "kt serve", log)
            grpc_port = json.loads(ready.read_text())["grpc_port"]
            res = subprocess.run(["bash", "-c", config_cmd], cwd=d, env=env,
                                 capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, res.stderr
            (d / "ca.pem").write_bytes(ca.cert_pem.bytes())
            listen, admin = free_port(), free_port()
            doc = rewrite(yaml.safe_load((d / "envoy.yaml").read_text()),
                          {"/etc/ssl/certs/ca-certificates.crt": str(d / "ca.pem")},
                          {("127.0.0.1", 10000): (LOOPBACK, listen),
                           ("127.0.0.1", 9901): (LOOPBACK, admin),
                           ("127.0.0.1", 8081): (LOOPBACK, grpc_port),
                           ("api.openai.com", 443): ("localhost", provider.port)})
            (d / "envoy.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
            envoy_log = d / "envoy.log"
            with open(envoy_log, "wb") as out:
                # other Envoys on this machine hold hot restart's base id 0
                proxy = subprocess.Popen(["bash", "-c", f"exec {envoy_cmd.rstrip('& ')} "
                                          "--use-dynamic-base-id"],
                                         cwd=d, env=env, stdout=out, stderr=subprocess.STDOUT)
            try:
                wait_until(lambda: proxy.poll() is None and _tcp(listen), 30, "envoy", envoy_log)
                curl = subprocess.run(["bash", "-c", curl_cmd.replace("localhost:10000",
                                                                      f"localhost:{listen}")],
                                      cwd=d, env=env, capture_output=True, text=True, timeout=30)
                assert curl.returncode == 0, curl.stderr
                answer = json.loads(curl.stdout)
                assert answer["served_by"] == "openai", curl.stdout + log_tail(envoy_log)
                got = provider.requests[-1]["headers"]
                assert got["authorization"] == "Bearer sk-readme-key"
                assert got["host"] == "api.openai.com" and got["x-kt-tenant"] == "acme"
                assert got["x-kt-decision"] == "allow"
            finally:
                stop_process(proxy)
        finally:
            stop_process(kt)
