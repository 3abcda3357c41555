"""The Redis URL, checked when the policy loads (`kt check-config`), so a typo is a policy
error naming the field instead of a traceback when `kt serve` connects."""
from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

SCHEMES = ("redis", "rediss", "unix")


def check_redis_url(url: str) -> None:
    """Raise ValueError saying what is wrong with ``url`` (never echoing its password)."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a port that is not a number in 0..65535
    except ValueError as exc:
        raise ValueError(f"not a usable URL ({exc})") from None
    if parts.scheme not in SCHEMES:
        raise ValueError(f"the scheme must be redis://, rediss:// or unix://, not "
                         f"{parts.scheme + '://' if parts.scheme else 'none'}")
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("unix:// needs the socket's path (unix:///path/to.sock)")
        db = parse_qs(parts.query).get("db", ["0"])[-1]
    else:
        if not parts.hostname:
            raise ValueError(f"{parts.scheme}:// needs a host (redis://host:6379/0)")
        if port == 0:
            raise ValueError("the port must be in 1..65535")
        db = parts.path.lstrip("/") or "0"
    if not db.isdigit():
        raise ValueError(f"the database must be a number (…/0), not {db[:20]!r}")
