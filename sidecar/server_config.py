"""What `kt serve` is told: listen addresses, credential files, the policy file, and how
long a reload check and a shutdown may take. Read by the wiring (server.py), the
credential checks (credentials.py) and the workers' supervisor (workers.py)."""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Optional

from sidecar.policy.load import CompiledPolicy, parse_policy
from sidecar.transports.http_side import ServerLimits


SAMPLE_SOURCE = "<sample policy>"


def sample_policy_raw() -> bytes:
    return resources.files("sidecar").joinpath("samples/policy.yaml").read_bytes()


def sample_policy() -> CompiledPolicy:
    """The policy shipped in the package, served when no --config is given."""
    return parse_policy(sample_policy_raw(), SAMPLE_SOURCE)


@dataclass
class ServerConfig:
    grpc_addr: str = "127.0.0.1:8081"
    http_addr: str = "127.0.0.1:9090"  # /metrics, /healthz, /readyz only
    admin_addr: str = "127.0.0.1:9091"  # POST /v1/usage, GET /v1/spend: with the admin token
    admin_token_file: Optional[str] = None  # else the policy's admin.token_file
    # a non-loopback --grpc (or --http-authz) needs one of these (docs/security.md)
    grpc_token_file: Optional[str] = None
    grpc_tls_cert: Optional[str] = None
    grpc_tls_key: Optional[str] = None
    grpc_client_ca: Optional[str] = None
    policy_path: Optional[str] = None  # None: the sample policy shipped in the package
    state_file: Optional[str] = None  # overrides the memory backend's state_file
    ready_file: Optional[str] = None  # JSON {"grpc_port", "http_port", ...} written once serving
    http_authz_addr: Optional[str] = None  # the fast path: Envoy's HTTP ext_authz
    # share the gRPC and HTTP-authz ports with sibling worker processes (kt serve --workers)
    reuse_port: bool = False
    # a worker of `kt serve --workers`: reservations shared through Redis whatever the
    # policy says, so that usage reaching a sibling (Envoy's connection moves to one when
    # a worker dies) replaces the estimate instead of adding to it
    share_reservations: bool = False
    # an OTLP/HTTP collector: a span per request (sidecar/tracing.py); None: no traces
    otlp_endpoint: Optional[str] = None
    otlp_sample_ratio: float = 1.0  # the share of requests that get a span
    reload_interval_s: float = 2.0
    grace_s: float = 2.0
    # connection limits and timeouts of the --http and --admin listeners
    side_limits: ServerLimits = ServerLimits()
