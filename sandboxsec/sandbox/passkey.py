"""A software passkey authenticator: the person's device when no browser is at hand.

The demo uses it without a browser (``--no-browser``), and the API tests use it to make
assertions that are wrong in one precise way.  It makes real ES256 keys, ``none`` attestation
objects and assertions over exactly what it is given, and can be told to misbehave (UV clear,
another origin or RP id, a bad signature, a frame, a stale counter).  Chromium's virtual
authenticator (CDP ``WebAuthn`` domain) plays the same part in the browser tests and the demo.
It is a simulator: its private key lives in memory, never use it as a real authenticator.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import struct
from dataclasses import dataclass, field
from typing import Any

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["AT", "BE", "BS", "UP", "UV", "SoftPasskey", "b64u", "b64u_dec"]


def b64u(data: bytes) -> str:
    """Unpadded base64url."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64u_dec(text: str) -> bytes:
    """Decode (unpadded) base64url."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


UP, UV, BE, BS, AT = 0x01, 0x04, 0x08, 0x10, 0x40


@dataclass
class SoftPasskey:
    """One resident ES256 credential for ``rp_id``."""

    rp_id: str
    origin: str
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    credential_id: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    user_handle: bytes = b""
    counter: int = 0

    def cose_key(self) -> bytes:
        """The public key as a COSE_Key (EC2, P-256, ES256)."""
        nums = self.key.public_key().public_numbers()
        return cbor2.dumps({1: 2, 3: -7, -1: 1, -2: nums.x.to_bytes(32, "big"),
                            -3: nums.y.to_bytes(32, "big")})

    def _client_data(self, kind: str, challenge: bytes, origin: str | None,
                     extra: dict[str, Any] | None) -> bytes:
        data = {"type": kind, "challenge": b64u(challenge), "origin": origin or self.origin,
                "crossOrigin": False, **(extra or {})}
        return json.dumps(data, separators=(",", ":")).encode()

    def create(self, options: dict[str, Any], *, origin: str | None = None,
               flags: int = UP | UV, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The JSON of ``navigator.credentials.create()`` for ``options['publicKey']``."""
        pk = options["publicKey"]
        self.user_handle = b64u_dec(pk["user"]["id"])
        client = self._client_data("webauthn.create", b64u_dec(pk["challenge"]), origin, extra)
        cred_data = (b"\x00" * 16 + struct.pack(">H", len(self.credential_id))
                     + self.credential_id + self.cose_key())
        auth = (hashlib.sha256(self.rp_id.encode()).digest() + bytes([flags | AT])
                + struct.pack(">I", self.counter) + cred_data)
        att = cbor2.dumps({"fmt": "none", "attStmt": {}, "authData": auth})
        return {"id": b64u(self.credential_id), "rawId": b64u(self.credential_id),
                "type": "public-key",
                "response": {"clientDataJSON": b64u(client), "attestationObject": b64u(att)}}

    def get(self, options: dict[str, Any], *, origin: str | None = None,
            flags: int = UP | UV, rp_id: str | None = None, bad_signature: bool = False,
            extra: dict[str, Any] | None = None, counter_step: int = 1,
            challenge: bytes | None = None) -> dict[str, Any]:
        """The JSON of ``navigator.credentials.get()`` for ``options['publicKey']``."""
        pk = options["publicKey"]
        self.counter += counter_step
        client = self._client_data("webauthn.get",
                                   challenge if challenge is not None
                                   else b64u_dec(pk["challenge"]), origin, extra)
        auth = (hashlib.sha256((rp_id or self.rp_id).encode()).digest() + bytes([flags])
                + struct.pack(">I", self.counter))
        sig = self.key.sign(auth + hashlib.sha256(client).digest(), ec.ECDSA(hashes.SHA256()))
        if bad_signature:
            sig = self.key.sign(b"something else", ec.ECDSA(hashes.SHA256()))
        return {"id": b64u(self.credential_id), "rawId": b64u(self.credential_id),
                "type": "public-key",
                "response": {"clientDataJSON": b64u(client), "authenticatorData": b64u(auth),
                             "signature": b64u(sig), "userHandle": b64u(self.user_handle)}}
