"""Who may talk to the sidecar: bearer tokens from files, and what counts as loopback.

The threat model (docs/security.md): whoever reaches the gRPC port can ask for a decision
as any tenant and report usage; whoever reaches the admin port can rewrite the books. So
a listener on anything but loopback needs a credential: a shared token that Envoy sends
(gRPC `initial_metadata`, HTTP ext_authz `headers_to_add`) or mTLS for gRPC, and the
admin API always takes its own token. Tokens are compared in constant time and re-read
when their file changes (a rotated Kubernetes Secret is picked up without a restart).
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import time
from typing import Optional

log = logging.getLogger("kt.auth")
MIN_TOKEN_LEN = 16  # shorter is a password, not a secret
_RESTAT_S = 1.0  # how often a token file is checked for a change


class TokenError(ValueError):
    """A token file that cannot be used; the message says which and why."""


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1, "localhost" and Unix sockets; "" and 0.0.0.0 are not."""
    host = host.strip()
    if host.startswith("unix:"):
        return True
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_of(addr: str) -> str:
    """The host of a HOST:PORT listen address ("" for ":8081"), or the unix: address."""
    if addr.startswith("unix:"):
        return addr
    return addr.rpartition(":")[0]


def is_loopback_peer(peer: str) -> bool:
    """A gRPC peer string ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:...")."""
    if peer.startswith("unix:"):
        return True
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return False
    return is_loopback_host(rest.rpartition(":")[0])


class TokenFile:
    """A bearer token kept in a file (first line, surrounding whitespace ignored)."""

    def __init__(self, path: str, what: str = "token") -> None:
        self.path = path
        self.what = what
        self._token = b""
        self._stamp: Optional[tuple] = None
        self._checked = 0.0
        self._load()

    def _load(self) -> None:
        try:
            st = os.stat(self.path)
            with open(self.path, "rb") as f:
                raw = f.read(4096)
        except OSError as exc:
            raise TokenError(f"{self.what} file {self.path}: {exc.strerror or exc}") from None
        token = raw.strip().split(b"\n", 1)[0].strip()
        if len(token) < MIN_TOKEN_LEN:
            raise TokenError(f"{self.what} file {self.path}: the token must be at least "
                             f"{MIN_TOKEN_LEN} characters")
        if not all(0x21 <= b <= 0x7E for b in token):
            raise TokenError(f"{self.what} file {self.path}: the token must be printable "
                             "ASCII without spaces (it travels in an HTTP header)")
        self._token = token
        self._stamp = (st.st_ino, st.st_mtime_ns, st.st_size)

    def token(self) -> bytes:
        """The current token; the file is re-read (at most once a second) when it changed.
        A file that turns unreadable or invalid keeps the last good token, logged."""
        now = time.monotonic()
        if now - self._checked >= _RESTAT_S:
            self._checked = now
            try:
                st = os.stat(self.path)
                stamp: Optional[tuple] = (st.st_ino, st.st_mtime_ns, st.st_size)
            except OSError:
                stamp = None
            if stamp is not None and stamp != self._stamp:
                try:
                    self._load()
                    log.info("%s file %s changed: new token in use", self.what, self.path)
                except TokenError as exc:
                    self._stamp = stamp
                    log.error("%s; still using the previous token", exc)
        return self._token

    def matches(self, authorization: Optional[str]) -> bool:
        """Does an `Authorization` value carry this token as a bearer credential?"""
        if not authorization:
            return False
        scheme, _, credential = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credential.strip().encode("latin-1", "replace"), self.token())


def bearer_from_metadata(metadata) -> Optional[str]:
    """The `authorization` value of gRPC invocation metadata, if any."""
    for key, value in metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode("latin-1", "replace")
    return None
