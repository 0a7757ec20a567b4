"""Offline checks an auditor runs on what the service sends: a signed checkpoint and an
entry's inclusion proof.  The service's word is never taken: signatures and proofs are
recomputed here, from the audit public key the auditor received out of band.

Formats (``docs/audit.md``): a checkpoint is a C2SP signed note whose body is
``origin\\nsize\\nbase64(root)\\n``, signed with Ed25519; the key id is the first 4 bytes of
``SHA-256(name || 0x0A || 0x01 || public key)``.  Leaves are ``SHA-256(0x00 || entry)`` and
nodes ``SHA-256(0x01 || left || right)`` (RFC 9162); inclusion proofs follow RFC 9162 2.1.3.2.
For a whole export use ``sandboxsec audit verify``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)

from sandboxsec_client.errors import ClientError

__all__ = ["AuditInvalid", "VerifiedCheckpoint", "verify_checkpoint", "verify_inclusion"]

_SIG_PREFIX = "\u2014 "


class AuditInvalid(ClientError):
    """A checkpoint or proof did not verify; ``code`` is ``audit_checkpoint_invalid``,
    ``audit_checkpoint_signature_invalid`` or ``audit_proof_invalid``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """A checkpoint whose signature verified under the trusted key."""

    origin: str
    size: int
    root_hash: bytes


def _public_key(pem: str | bytes) -> Ed25519PublicKey:
    key = load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    if not isinstance(key, Ed25519PublicKey):
        raise AuditInvalid("audit_checkpoint_signature_invalid", "the audit key is not Ed25519")
    return key


def _b64(text: str, what: str, code: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise AuditInvalid(code, f"{what} is not base64") from None


def verify_checkpoint(note: str, public_key_pem: str | bytes, key_name: str) -> VerifiedCheckpoint:
    """1. split body and signatures, 2. parse origin, size and root, 3. find the line of
    ``key_name`` with the matching key id and verify its Ed25519 signature over the body."""
    bad = "audit_checkpoint_invalid"
    # 1. body, blank line, signature lines
    body, sep, sigs = note.partition("\n\n")
    lines = body.split("\n")
    if not sep or not sigs.endswith("\n") or len(lines) < 3:
        raise AuditInvalid(bad, "not a signed checkpoint note")
    # 2. origin, canonical decimal size, 32-byte root
    origin, size_text, root_text = lines[:3]
    if not origin or not size_text.isdigit() or (size_text != "0" and size_text[0] == "0"):
        raise AuditInvalid(bad, "checkpoint origin or size is malformed")
    root = _b64(root_text, "the root hash", bad)
    if len(root) != 32:
        raise AuditInvalid(bad, "the root hash is not 32 bytes")
    # 3. our key's signature
    key = _public_key(public_key_pem)
    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    kid = hashlib.sha256(key_name.encode() + b"\n\x01" + raw).digest()[:4]
    for line in sigs[:-1].split("\n"):
        if not line.startswith(_SIG_PREFIX):
            raise AuditInvalid(bad, "a signature line is malformed")
        name, _, blob = line[len(_SIG_PREFIX):].partition(" ")
        sig = _b64(blob, "a signature", bad)
        if name != key_name or sig[:4] != kid:
            continue  # another signer (a witness): not ours to check here
        try:
            key.verify(sig[4:], (body + "\n").encode("utf-8"))
        except InvalidSignature:
            raise AuditInvalid("audit_checkpoint_signature_invalid",
                               f"bad signature by {key_name}") from None
        return VerifiedCheckpoint(origin, int(size_text), root)
    raise AuditInvalid("audit_checkpoint_signature_invalid",
                       f"the checkpoint is not signed by {key_name}")


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _root_from_path(index: int, size: int, leaf: bytes, path: Sequence[bytes]) -> bytes | None:
    # RFC 9162 2.1.3.2, step by step
    if not 0 <= index < size:
        return None
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = _node(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = _node(r, p)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None


def verify_inclusion(proof: Mapping[str, Any], public_key_pem: str | bytes,
                     key_name: str) -> VerifiedCheckpoint:
    """Check an answer of ``GET /v1/audit/proof``: the checkpoint's signature, then that the
    entry line hashes to a leaf the proof places at ``seq`` under the signed root."""
    checkpoint = verify_checkpoint(str(proof["checkpoint"]), public_key_pem, key_name)
    if int(proof["tree_size"]) != checkpoint.size:
        raise AuditInvalid("audit_proof_invalid", "the proof is for another tree size")
    path = [_b64(str(h), "a proof hash", "audit_proof_invalid") for h in proof["proof"]]
    if any(len(h) != 32 for h in path):
        raise AuditInvalid("audit_proof_invalid", "a proof hash is not 32 bytes")
    leaf = hashlib.sha256(b"\x00" + str(proof["entry"]).encode("utf-8")).digest()
    if _root_from_path(int(proof["seq"]), checkpoint.size, leaf, path) != checkpoint.root_hash:
        raise AuditInvalid("audit_proof_invalid",
                           f"entry {proof['seq']} is not in the signed tree")
    return checkpoint
