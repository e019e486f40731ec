"""Signing keys made in the test, their JWKS, and tokens signed with PyJWT."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm


class Key:
    def __init__(self, kind: str, kid: str) -> None:
        self.kid = kid
        self.private: Any
        if kind == "RSA":
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.alg = "RS256"
            self.jwk = dict(RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True))
        else:
            self.private = ec.generate_private_key(ec.SECP256R1())
            self.alg = "ES256"
            self.jwk = dict(ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True))
        self.jwk["kid"] = kid

    def public_pem(self) -> bytes:
        return bytes(self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def token(self, *, kid: str | None = "same", alg: str | None = None,
              ttl: float = 300, **claims: Any) -> bytes:
        payload: dict[str, Any] = {"sub": "device-1", "exp": int(time.time() + ttl)}
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        headers = {"kid": self.kid if kid == "same" else kid}
        if headers["kid"] is None:
            headers = {}
        return jwt.encode(payload, self.private, algorithm=alg or self.alg,
                          headers=headers).encode()


def jwks(*keys: Key) -> dict[str, Any]:
    return {"keys": [k.jwk for k in keys]}


def write_jwks(path: Path, *keys: Key) -> None:
    """Atomically, as an operator's deploy tool (or Kubernetes) would."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(jwks(*keys)))
    os.replace(tmp, path)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(payload: dict[str, Any]) -> bytes:
    """alg "none": no signature at all."""
    head = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{head}.{_b64(json.dumps(payload).encode())}.".encode()


def hmac_with_public_key(key: Key, payload: dict[str, Any]) -> bytes:
    """The algorithm-confusion attack: HS256 'signed' with the public key as the secret."""
    head = _b64(json.dumps({"alg": "HS256", "kid": key.kid}).encode())
    body = _b64(json.dumps(payload).encode())
    sig = hmac.new(key.public_pem(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}".encode()
