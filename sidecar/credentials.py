"""Who may use each port (docs/security.md): the tokens and TLS material of one server,
checked before anything binds, the gRPC token check, and the admin API's rule."""
from __future__ import annotations

from typing import Optional

import grpc

from sidecar.auth import (TokenError, TokenFile, bearer_from_metadata, host_of,
                          is_loopback_host)
from sidecar.metrics import Metrics
from sidecar.policy.load import CompiledPolicy
from sidecar.server_config import ServerConfig
from sidecar.transports.http_side import HttpRequest
from sidecar.transports.usage_api import REPORT_METHOD


class ExposureError(ValueError):
    """A listener would be reachable beyond loopback without a credential; says which."""


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ExposureError(f"{what} {path}: {exc.strerror or exc}") from None


class Credentials:
    """The tokens and TLS material of one server, loaded and checked before anything
    binds: a listener reachable beyond loopback without a credential is refused."""

    def __init__(self, cfg: ServerConfig, policy: CompiledPolicy) -> None:
        admin_file = cfg.admin_token_file or policy.admin_token_file
        try:
            self.admin = TokenFile(admin_file, "admin token") if admin_file else None
            self.grpc = (TokenFile(cfg.grpc_token_file, "gRPC token")
                         if cfg.grpc_token_file else None)
        except TokenError as exc:
            raise ExposureError(str(exc)) from None
        if (cfg.grpc_tls_cert is None) != (cfg.grpc_tls_key is None):
            raise ExposureError("--grpc-tls-cert and --grpc-tls-key go together")
        if cfg.grpc_client_ca and cfg.grpc_tls_cert is None:
            raise ExposureError("--grpc-client-ca needs --grpc-tls-cert and --grpc-tls-key")
        self.grpc_tls: Optional[grpc.ServerCredentials] = None
        self.mtls = bool(cfg.grpc_client_ca)
        if cfg.grpc_tls_cert and cfg.grpc_tls_key:
            self.grpc_tls = grpc.ssl_server_credentials(
                [(_read(cfg.grpc_tls_key, "--grpc-tls-key"),
                  _read(cfg.grpc_tls_cert, "--grpc-tls-cert"))],
                root_certificates=(_read(cfg.grpc_client_ca, "--grpc-client-ca")
                                   if cfg.grpc_client_ca else None),
                require_client_auth=self.mtls)
        # whoever reaches the gRPC port (or the fast path) can be decided and charged as
        # any tenant and report usage, and the admin port rewrites the books: beyond
        # loopback only with a credential
        need = {"--grpc": "--grpc-token-file FILE or mTLS (--grpc-tls-cert, --grpc-tls-key, "
                          "--grpc-client-ca)",
                "--http-authz": "--grpc-token-file FILE (Envoy sends it in `authorization`)",
                "--admin": "--admin-token-file FILE (or policy admin.token_file)"}
        for flag, addr, ok in (("--grpc", cfg.grpc_addr, self.grpc is not None or self.mtls),
                               ("--http-authz", cfg.http_authz_addr, self.grpc is not None),
                               ("--admin", cfg.admin_addr, self.admin is not None)):
            if addr and not ok and not is_loopback_host(host_of(addr)):
                raise ExposureError(f"{flag} {addr} is reachable beyond loopback without a "
                                    f"credential; give {need[flag]}, or bind it to 127.0.0.1 "
                                    "(docs/security.md)")


class GrpcTokenCheck(grpc.aio.ServerInterceptor):
    """Every call but health checks carries the gRPC token (`authorization: Bearer ...`,
    which Envoy's grpc_service initial_metadata sends); a usage report may carry the admin
    token instead. Installed only when a gRPC token is configured."""

    def __init__(self, grpc_token: TokenFile, admin_token: Optional[TokenFile],
                 metrics: Metrics) -> None:
        self.grpc_token = grpc_token
        self.admin_token = admin_token
        self.refused = metrics.auth_failures.labels("grpc")

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "this sidecar needs `authorization: Bearer <token>` metadata")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(self, continuation, details):
        method = details.method
        if method.startswith("/grpc.health.v1.Health/"):  # kubelet probes send no metadata
            return await continuation(details)
        auth = bearer_from_metadata(details.invocation_metadata)
        if self.grpc_token.matches(auth) or (
                method == REPORT_METHOD and self.admin_token is not None
                and self.admin_token.matches(auth)):
            return await continuation(details)
        self.refused.inc()
        return self._deny


def browser_problem(req: HttpRequest) -> Optional[str]:
    """Why a tokenless admin port refuses ``req`` as a web page's, or None. Without a token
    the port trusts loopback, and a browser on the same machine is on loopback: a page of
    any site may send it a POST without asking first (a "simple" cross-origin request:
    freeze, unfreeze, a usage report), and a page whose name was rebound to 127.0.0.1 may
    read it. Browsers name the page's origin in ``Origin`` on every cross-origin request
    and every POST, and send the page's own host name in ``Host``: kt's clients send
    neither an Origin nor a name other than loopback's."""
    if "origin" in req.headers:
        return "a request from a web page (it carries an Origin header)"
    host = req.headers.get("host", "").strip().lower()  # a name, in any case
    if host:
        if host.startswith("["):  # [::1]:9091
            name = host[1:host.find("]")]
        elif host.count(":") == 1:  # 127.0.0.1:9091, localhost:9091
            name = host.partition(":")[0]
        else:
            name = host
        if not is_loopback_host(name):
            return f"Host {host[:100]!r} is not a loopback address"
    return None


def admin_allows(token: Optional[TokenFile], req: HttpRequest) -> bool:
    """The admin API's one rule: the token when one is configured; else (the port is
    bound to loopback, Credentials refuses anything else) a loopback caller."""
    if token is not None:
        return token.matches(req.headers.get("authorization"))
    return is_loopback_host(req.peer)
