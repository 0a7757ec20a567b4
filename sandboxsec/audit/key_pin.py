"""One log, one checkpoint key: a log is pinned to the key that signed its last checkpoint.

Auditors verify a log's export under one public key, so a checkpoint signed into it by any
other key (a node with its own keys, or a key changed behind the log's back) would make every
later export fail.  Before signing, the writer checks that the log's newest stored checkpoint
verifies under its own key, in the transaction that inserts the new one; if not, it refuses
with :class:`AuditCheckpointKeyMismatchError` and nothing is appended.  A log without a
checkpoint takes the first key that signs it.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.engine import Connection

from sandboxsec.audit.checkpoint import verify_signed_checkpoint
from sandboxsec.audit.errors import (
    AuditCheckpointInvalidError,
    AuditCheckpointKeyMismatchError,
    AuditCheckpointSignatureError,
)
from sandboxsec.audit.store import CHECKPOINTS

__all__ = ["check_checkpoint_key"]


def check_checkpoint_key(conn: Connection, log_id: str, public_key: Ed25519PublicKey,
                         name: str) -> None:
    """Raise unless the newest checkpoint of ``log_id`` (if any) is signed by ``public_key``
    under ``name``."""
    note = conn.execute(
        select(CHECKPOINTS.c.note)
        .where(CHECKPOINTS.c.tenant_id == log_id)
        .order_by(CHECKPOINTS.c.size.desc())
        .limit(1)
    ).scalar()
    if note is None:
        return
    try:
        verify_signed_checkpoint(str(note), public_key, name=name)
    except (AuditCheckpointSignatureError, AuditCheckpointInvalidError):
        raise AuditCheckpointKeyMismatchError(
            f"log {log_id}'s checkpoints are signed by another key than this service's "
            "checkpoint key; nothing is signed into it") from None
