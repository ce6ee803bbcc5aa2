"""An identity provider's published keys for tests: RSA and EC key pairs, their JWKS, tokens
signed with them, and a real HTTP server on loopback serving the JWKS (and counting fetches)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ISSUER = "https://idp.test.example/realms/trust"
AUDIENCE = "urn:concierge:api"


@dataclass
class ProviderKey:
    kid: str
    algorithm: str
    private: Any

    @classmethod
    def rsa(cls, kid: str) -> ProviderKey:
        return cls(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))

    @classmethod
    def ec(cls, kid: str) -> ProviderKey:
        return cls(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))

    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        kind = (
            jwt.algorithms.RSAAlgorithm if self.algorithm == "RS256" else jwt.algorithms.ECAlgorithm
        )
        jwk: dict[str, Any] = kind.to_jwk(public, as_dict=True)
        return {**jwk, "kid": self.kid, "alg": self.algorithm, "use": "sig"}

    def sign(self, claims: dict[str, Any], **header: Any) -> str:
        return jwt.encode(
            claims, self.private, algorithm=self.algorithm, headers={"kid": self.kid, **header}
        )


def provider_claims(role: str, org: str, ttl: int = 600, **extra: Any) -> dict[str, Any]:
    """What a provider configured for the concierge puts in an access token."""
    now = int(time.time())
    return {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": f"idp|{uuid.uuid4().hex[:8]}",
        "role": role,
        "org": org,
        "iat": now,
        "exp": now + ttl,
        "jti": str(uuid.uuid4()),
        **extra,
    }


@dataclass
class JwksServer:
    """A JWKS on ``http://127.0.0.1:{port}/jwks``; ``keys`` may change while it serves."""

    keys: list[ProviderKey]
    fetches: int = 0
    server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/jwks"

    def document(self) -> bytes:
        return json.dumps({"keys": [k.jwk() for k in self.keys]}).encode()


@contextmanager
def serve_jwks(keys: list[ProviderKey]) -> Iterator[JwksServer]:
    served = JwksServer(list(keys))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the http.server protocol names it
            if self.path != "/jwks":
                self.send_error(404)
                return
            with served._lock:
                served.fetches += 1
                body = served.document()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: http.server writes every request to stderr, which is the test's output."""

    served.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=served.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        served.server.shutdown()
        served.server.server_close()
        thread.join(5)
