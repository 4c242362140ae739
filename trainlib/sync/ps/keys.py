"""Every key the parameter server uses, derived from the one shared token.

One secret (the token: a Kubernetes Secret, or made by rank 0 in colocated mode) and one key per
purpose, so that no key serves two roles:

    requests  (worker -> server)  Poly1305 message key  K_c2s
    replies   (server -> worker)  Poly1305 message key  K_s2c   (a request bounced back to its
                                  sender fails the reply check: replies cannot be reflected)
    connection (ZeroMQ handshake) a PLAIN credential, or CURVE key pairs for server and workers

Each is SHA-256(label || 0 || token) with a distinct label (a one-step KDF: the token is a
high-entropy secret, so no salt or stretching is needed). The labels carry a version, so a
change of protocol never reuses a key.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import zmq
from zmq.utils import z85

PLAIN_USERNAME = b"trainlib-ps"


def derive(token: str | bytes, label: str) -> bytes:
    """32 bytes for one purpose: SHA-256(label || 0 || token)."""
    raw = token.encode() if isinstance(token, str) else token
    return hashlib.sha256(f"trainlib-ps-{label}".encode() + b"\0" + raw).digest()


def mac_keys(token: str | bytes) -> tuple[bytes, bytes]:
    """(worker -> server key, server -> worker key) for the per-message Poly1305 tags."""
    return derive(token, "mac-c2s-v3"), derive(token, "mac-s2c-v3")


@dataclass(frozen=True)
class ConnKeys:
    """Connection-level credentials (ZeroMQ security mechanisms), all from the token.

    z85 strings for CURVE (libzmq's format); `plain_password` is what a PLAIN client presents
    and the server's ZAP handler compares; `curve_client_public_raw` is what ZAP sees for CURVE."""

    plain_password: bytes
    curve_server_public: bytes
    curve_server_secret: bytes
    curve_client_public: bytes
    curve_client_secret: bytes
    curve_client_public_raw: bytes


def conn_keys(token: str | bytes) -> ConnKeys:
    # a Curve25519 secret key is any 32 bytes (libsodium clamps it); the public key follows from it
    server_secret = z85.encode(derive(token, "curve-server-v1"))
    client_secret = z85.encode(derive(token, "curve-client-v1"))
    client_public = zmq.curve_public(client_secret)
    return ConnKeys(plain_password=z85.encode(derive(token, "plain-v1")),
                    curve_server_public=zmq.curve_public(server_secret), curve_server_secret=server_secret,
                    curve_client_public=client_public, curve_client_secret=client_secret,
                    curve_client_public_raw=z85.decode(client_public))
