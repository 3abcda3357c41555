"""HOST:PORT as operators type it (flags of `kt serve` and `kt envoy-config`), checked
before anything binds or is printed, so a typo is one clear line, not a traceback."""
from __future__ import annotations

import ipaddress
import re

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


class AddressError(ValueError):
    """An address that cannot be used; the message names the flag and says why."""


def split_host_port(text: str, what: str) -> tuple[str, str | None]:
    """HOST, [V6], HOST:PORT or [V6]:PORT into host and port text (None when absent)."""
    if text.startswith("["):
        end = text.find("]")
        tail = text[end + 1:] if end > 0 else "?"
        if end < 0 or (tail and not tail.startswith(":")):
            raise AddressError(f"{what} {text!r}: expected [IPv6]:PORT")
        return text[1:end], (tail[1:] if tail else None)
    if text.count(":") > 1:
        raise AddressError(f"{what} {text!r}: write an IPv6 address in brackets, [::1]:PORT")
    host, sep, port = text.partition(":")
    return host, (port if sep else None)


def check_port(port: str, text: str, what: str, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if not port.isdigit() or not low <= int(port) < 65536:
        raise AddressError(f"{what} {text!r}: the port must be a number from {low} to 65535")
    return int(port)


def check_host(host: str, what: str) -> None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.match(host):
            raise AddressError(f"{what}: {host!r} is neither an IP address nor a host name") \
                from None


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def parse_hostport(text: str, what: str, allow_zero: bool = False) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [::1]:PORT); port 0 (any free port) only where `allow_zero`."""
    host, port = split_host_port(text, what)
    if not host or port is None:
        raise AddressError(f"{what} {text!r}: expected HOST:PORT")
    check_host(host, f"{what} {text!r}")
    return host, check_port(port, text, what, allow_zero)
