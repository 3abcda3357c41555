"""A `kt` command's call to a running sidecar's admin port (`kt spend`, `kt status`,
`kt tenants`): the admin token from --token-file, and every failure as one line that says
what went wrong and what to do (the wrong port, a missing token, the body of a 400)."""
from __future__ import annotations

import argparse
import http.client
import json
import sys
import urllib.error
import urllib.request
from typing import Any, Optional

from sidecar.auth import TokenError, TokenFile

ADMIN_PORT_HINT = ("give --admin the address of `kt serve --admin` (default 127.0.0.1:9091; "
                   "`kt serve --ready-file` writes the admin_port it bound)")


class AdminFailed(Exception):
    """An admin-port call failed; the message is printed, the value is the exit code."""


def client_args(p: argparse.ArgumentParser) -> None:
    """The flags of a command that reads a running sidecar's admin port."""
    p.add_argument("--admin", default="127.0.0.1:9091", metavar="HOST:PORT",
                   help="the sidecar's admin port")
    p.add_argument("--token-file", metavar="FILE", help="the admin token (kt serve "
                   "--admin-token-file); not needed on loopback when none is configured")
    p.add_argument("--json", action="store_true", help="print JSON")


def _error_text(exc: urllib.error.HTTPError) -> str:
    """": <message>" of the JSON error body the admin port answers (every error of a
    block, when it lists them), or ""."""
    try:
        err = json.load(exc)["error"]
        errors = err.get("errors") or []
        if len(errors) > 1:
            return ": " + "; ".join(str(e) for e in errors)
        return ": " + str(err["message"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return ""


def admin_call(args: argparse.Namespace, command: str, path: str, query: str = "",
               method: str = "GET", body: Optional[Any] = None) -> Any:
    """Call the admin port (--admin, --token-file) and return its JSON answer, or raise
    AdminFailed after printing one line that says what went wrong and what to do."""
    url = f"http://{args.admin}{path}" + (f"?{query}" if query else "")
    headers = {}
    if args.token_file:
        try:
            headers["authorization"] = "Bearer " + TokenFile(args.token_file,
                                                             "admin token").token().decode()
        except TokenError as exc:
            print(f"kt {command}: {exc}", file=sys.stderr)
            raise AdminFailed(2) from None
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["content-type"] = "application/json"
    try:
        # the admin port is never behind a proxy: ignore http_proxy
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        with opener.open(req, timeout=15) as r:
            return json.load(r)
    except urllib.error.HTTPError as exc:
        message = _error_text(exc)
        hint = {401: " (give --token-file with the admin token)"}.get(exc.code, "")
        if exc.code == 404 and not message:
            hint = (f" ({args.admin} is not the sidecar's admin port: the HTTP side port "
                    f"answers /metrics only; {ADMIN_PORT_HINT})")
        what = url if method == "GET" else f"{method} {url}"
        print(f"kt {command}: {what}: HTTP {exc.code}{message}{hint}", file=sys.stderr)
        raise AdminFailed(1) from None
    except (http.client.HTTPException, ConnectionResetError) as exc:
        # an answer that is not HTTP/1.1: the gRPC port (HTTP/2) or another service
        print(f"kt {command}: {args.admin} did not answer as the admin port does ({exc!r}): "
              f"the gRPC port? {ADMIN_PORT_HINT}", file=sys.stderr)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        refused = isinstance(getattr(exc, "reason", exc), ConnectionRefusedError)
        hint = f" (nothing listens there: is kt serve running? {ADMIN_PORT_HINT})" \
            if refused else ""
        print(f"kt {command}: cannot read {url}: {exc}{hint}", file=sys.stderr)
    raise AdminFailed(1)
