"""Which requests the gateway passes to a provider: the metered API, plus what the operator
lists. Everything else is answered 404 by Envoy itself, on a route with every filter off (no
decision, no credential injected): a gateway that injects the provider's key on every path
hands batch jobs, file uploads and fine-tunes, which the provider bills and the sidecar
never sees, to any client (docs/security.md).

Pure: the endpoint list in, route matches and the refusal's body out (sidecar/envoy_config.py
builds the routes from them).
"""
from __future__ import annotations

import re
from typing import NamedTuple, Sequence

from sidecar import contract


class Endpoint(NamedTuple):
    method: str
    path: str  # matched exactly, without the query string


# The endpoints the sidecar meters: estimated from the request body, settled from the
# reply's usage (docs/usage.md). POST only.
METERED: tuple[Endpoint, ...] = tuple(Endpoint("POST", p) for p in (
    "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings",
    "/v1/messages"))

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
MAX_PATH = 256
# one or more segments of unreserved characters (RFC 3986), no empty, "." or ".." segment,
# no percent-encoding: what an exact match on the raw path can hold without ambiguity
_PATH = re.compile(r"^(/[A-Za-z0-9._~-]+)+$")


class EndpointError(ValueError):
    """An endpoint spec that cannot be used; the message says why."""


def parse_endpoint(spec: str, what: str = "--pass-path") -> Endpoint:
    """``METHOD:/PATH`` (``GET:/v1/models``): one more endpoint passed to the provider,
    matched exactly (method, and the path without its query string)."""
    method, sep, path = spec.partition(":")
    if not sep or method not in METHODS:
        raise EndpointError(f"{what} {spec!r}: expected METHOD:/PATH with METHOD one of "
                            f"{', '.join(METHODS)} (e.g. GET:/v1/models)")
    if len(path) > MAX_PATH or not _PATH.match(path) or any(
            seg in (".", "..") for seg in path.split("/")):
        raise EndpointError(f"{what} {spec!r}: the path must be /SEGMENT[/SEGMENT...] of "
                            "letters, digits and . _ ~ - (no '.' or '..' segment, no "
                            f"query, no wildcard, at most {MAX_PATH} characters); it is "
                            "matched exactly")
    return Endpoint(method, path)


def routed(passed: Sequence[Endpoint] = ()) -> list[Endpoint]:
    """The metered endpoints, then the passed ones not already among them, in order."""
    out = list(METERED)
    for e in passed:
        if e not in out:
            out.append(e)
    return out


def route_name(e: Endpoint) -> str:
    """The name of the endpoint's routes ("POST /v1/chat/completions"): what the access log
    and ext_proc report as the request's endpoint."""
    return f"{e.method} {e.path}"


def not_routed_body(endpoints: Sequence[Endpoint]) -> str:
    """The 404's OpenAI-style error body: what this gateway does route."""
    listed = ", ".join(f"{e.method} {e.path}" for e in endpoints)
    return contract.error_body(
        f"This gateway routes only {listed}; other methods and paths are not served.",
        "invalid_request_error", "unknown_url").decode()
