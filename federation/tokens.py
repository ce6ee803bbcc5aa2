"""Signed messages between the hub and its nodes (PyJWT, EdDSA over Ed25519 keys).

The hub signs every question it sends to a node: a short-lived JWT for that node alone
(``aud``), naming the hub (``iss``), the organisation it asks for (``org``), its ``role``
(``sponsor``, or ``admin`` for the exact mode) and the SHA-256 of the request body (``body``),
so a captured token cannot carry another question. The node checks it with the hub's public
key. The node signs every reply the same way (``iss`` the node, ``aud`` the hub, ``body`` the
reply's SHA-256, ``req`` the question's ``jti``), and the hub checks it with the key it
registered for that node: a reply that does not verify is counted as missing, never combined.

Asymmetric keys (not the site's HS256 token keys): a node holds only the hub's public key, so a
node cannot forge the hub's questions to another node, and the hub cannot forge a node's reply.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALGORITHM = "EdDSA"
#: Questions and replies are good for this long (a question is answered within the hub's
#: deadline, seconds).
LIFETIME_SECONDS = 60
LEEWAY_SECONDS = 5.0
#: The header a node's reply signature travels in.
REPLY_HEADER = "X-Concierge-Node-Signature"

HubRole = Literal["sponsor", "admin"]


class SignatureError(ValueError):
    """A question or reply whose signature, audience, issuer, age or body digest is wrong."""


def generate_key() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as PEM: (private, public)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


def load_private(pem: bytes) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError("the private key is not an Ed25519 key")
    return key


def load_public(pem: bytes) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError("the public key is not an Ed25519 key")
    return key


def load_private_file(path: Path) -> Ed25519PrivateKey:
    return load_private(Path(path).read_bytes())


def load_public_file(path: Path) -> Ed25519PublicKey:
    return load_public(Path(path).read_bytes())


def digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def node_audience(node: str) -> str:
    return f"urn:concierge:node:{node}"


def hub_audience(hub: str) -> str:
    return f"urn:concierge:hub:{hub}"


@dataclass(frozen=True)
class HubQuestion:
    """The verified claims of a hub's question."""

    hub: str
    org: str
    role: HubRole
    jti: str
    exp: int


def sign_question(
    key: Ed25519PrivateKey,
    hub: str,
    node: str,
    org: str,
    role: HubRole,
    body: bytes,
    now: float | None = None,
) -> tuple[str, str]:
    """The hub's token for asking ``node`` the question ``body``: (token, its jti)."""
    issued = int(now if now is not None else time.time())
    jti = uuid.uuid4().hex
    claims = {
        "iss": hub,
        "aud": node_audience(node),
        "sub": org,
        "org": org,
        "role": role,
        "body": digest(body),
        "iat": issued,
        "nbf": issued,
        "exp": issued + LIFETIME_SECONDS,
        "jti": jti,
    }
    return jwt.encode(claims, key, algorithm=ALGORITHM), jti


def _decode(token: str, key: Ed25519PublicKey, audience: str, issuer: str) -> dict[str, Any]:
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            audience=audience,
            issuer=issuer,
            leeway=LEEWAY_SECONDS,
            options={"require": ["iss", "aud", "exp", "iat", "jti", "body"]},
        )
    except jwt.PyJWTError as exc:
        raise SignatureError(f"{type(exc).__name__}: {exc}") from None
    return claims


def verify_question(
    token: str, key: Ed25519PublicKey, hub: str, node: str, body: bytes
) -> HubQuestion:
    """The hub's question as ``node`` checks it; :class:`SignatureError` otherwise."""
    claims = _decode(token, key, node_audience(node), hub)
    if claims["body"] != digest(body):
        raise SignatureError("the question's body is not the one the hub signed")
    role = claims.get("role")
    org = claims.get("org")
    if role not in ("sponsor", "admin") or not isinstance(org, str) or not org:
        raise SignatureError("the question names no organisation or an unknown role")
    return HubQuestion(hub=hub, org=org, role=role, jti=str(claims["jti"]), exp=int(claims["exp"]))


def sign_reply(key: Ed25519PrivateKey, node: str, hub: str, body: bytes, question_jti: str) -> str:
    """The node's signature over its reply ``body`` to the question ``question_jti``."""
    issued = int(time.time())
    claims = {
        "iss": node,
        "aud": hub_audience(hub),
        "body": digest(body),
        "req": question_jti,
        "iat": issued,
        "exp": issued + LIFETIME_SECONDS,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, key, algorithm=ALGORITHM)


def verify_reply(
    token: str, key: Ed25519PublicKey, node: str, hub: str, body: bytes, question_jti: str
) -> None:
    """Raise :class:`SignatureError` unless ``body`` is ``node``'s signed reply to the
    question ``question_jti``."""
    claims = _decode(token, key, hub_audience(hub), node)
    if claims["body"] != digest(body):
        raise SignatureError("the reply's body is not the one the node signed")
    if claims.get("req") != question_jti:
        raise SignatureError("the reply answers another question")


__all__ = [
    "ALGORITHM",
    "REPLY_HEADER",
    "HubQuestion",
    "SignatureError",
    "generate_key",
    "load_private",
    "load_private_file",
    "load_public",
    "load_public_file",
    "sign_question",
    "sign_reply",
    "verify_question",
    "verify_reply",
]
