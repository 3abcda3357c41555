"""RS256 JSON Web Tokens for tests: a key pair with its JWKS, and tokens it signs (the
shape an identity provider gives Envoy's jwt_authn), with the cryptography package that
trustme already brings."""
from __future__ import annotations

import base64
import json
from typing import Any


def rs256_keys() -> tuple[Any, dict]:
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    nums = key.public_key().public_numbers()

    def b64(n: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes((n.bit_length() + 7) // 8, "big")) \
            .rstrip(b"=").decode()
    return key, {"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": "k1",
                           "n": b64(nums.n), "e": b64(nums.e)}]}


def rs256_token(key: Any, claims: dict) -> str:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    signing_input = (b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "k1"}).encode()) + "."
                     + b64(json.dumps(claims).encode()))
    sig = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64(sig)}"
