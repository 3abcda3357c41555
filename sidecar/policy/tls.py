"""TLS to Redis (rediss://): one context, built the same way for the policy check and
the hot-path connection (redis-py builds its own from the same three settings)."""
from __future__ import annotations

import ssl
from typing import Optional

from sidecar.policy import schema


def tls_context(cfg: schema.RedisBackend) -> Optional[ssl.SSLContext]:
    """None for a plain redis:// or unix:// URL. Raises OSError / ssl.SSLError for files
    that cannot be used (the policy loader turns that into a policy error)."""
    if not cfg.url.startswith("rediss://"):
        return None
    tls = cfg.tls or schema.Tls()
    ctx = ssl.create_default_context(cafile=tls.ca_file)  # verifies the server and its name
    if tls.cert_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    return ctx
