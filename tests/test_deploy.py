"""The deployment examples stay in step with the CLI and the side port."""
from __future__ import annotations

from pathlib import Path

import yaml

from sidecar.cli import build_parser
from sidecar.policy.load import parse_policy

DEPLOY = Path(__file__).parent.parent / "docs" / "deploy"


def test_kubernetes_example_args_probes_and_policy_are_real():
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()))
    policy = docs[0]["data"]["policy.yaml"]
    parsed = parse_policy(policy.encode(), "kubernetes.yaml ConfigMap")
    assert parsed.tenant_metadata is not None and "acme" in parsed.tenants
    pod = docs[1]["spec"]["template"]["spec"]
    kt = next(c for c in pod["containers"] if c["name"] == "kt-sidecar")
    args = build_parser().parse_args(["serve", *kt["args"]])
    assert args.workers == 2 and args.http_authz == "127.0.0.1:8082"
    http_port = int(args.http.rsplit(":", 1)[1])
    assert kt["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": http_port}
    assert kt["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": http_port}
    assert kt["ports"][0]["containerPort"] == http_port


def test_istio_example_parses_and_points_at_the_grpc_port():
    docs = list(yaml.safe_load_all((DEPLOY / "istio.yaml").read_text()))
    provider = docs[0]["extensionProviders"][0]
    assert provider["envoyExtAuthzGrpc"]["port"] == 8081
    assert docs[1]["spec"]["provider"]["name"] == provider["name"]
