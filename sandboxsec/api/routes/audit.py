"""Routes: the auditor's view of the tenant's own audit log (checkpoints, exports, proofs).

Every route is for the ``auditor`` role and reads only the caller's tenant log: the log id is
the caller's tenant id, never a parameter, so another tenant's log cannot even be named.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from sandboxsec.api.deps import ServicesDep, require
from sandboxsec.audit.checkpoint import key_id
from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.record import AuditRecord
from sandboxsec.principal import Principal

# Sequence numbers and tree sizes fit a signed 64-bit column; larger ones are refused (400).
MAX_SEQ = 2**62

router = APIRouter(tags=["audit"])

Auditor = Annotated[Principal, Depends(require("audit:read"))]


class CheckpointOut(BaseModel):
    log_id: str
    origin: str
    size: int = Field(description="Tree size: the number of entries the checkpoint covers.")
    root_hash: str = Field(description="Base64 RFC 9162 root hash.")
    note: str = Field(description="The C2SP signed-note checkpoint, as signed.")
    key_name: str
    created_at: datetime
    cosignatures: list[str] = Field(
        default_factory=list,
        description="Witness cosignature lines (C2SP cosignature/v1) on this checkpoint; "
        "verify them with the witness keys you trust.",
    )
    cosigned_note: str = Field(
        default="", description="The note with the cosignature lines appended (C2SP form)."
    )


class AuditKeyOut(BaseModel):
    key_name: str
    key_id_hex: str
    public_key_pem: str
    verifier_key: str = Field(description="Signed-note verifier key: name+keyid+base64(key).")


class InclusionOut(BaseModel):
    log_id: str
    seq: int
    entry: str = Field(description="The canonical entry line that the leaf hashes.")
    tree_size: int
    checkpoint: str
    proof: list[str] = Field(description="Base64 RFC 9162 audit path, leaf level first.")


class ConsistencyOut(BaseModel):
    log_id: str
    first: int
    second: int
    first_checkpoint: str
    second_checkpoint: str
    proof: list[str]


class HashIn(BaseModel):
    value: Any = Field(description="A value to match against the log's HMAC'd fields.")


class HashOut(BaseModel):
    hmac: str


@router.get("/audit/checkpoint", response_model=CheckpointOut)
def checkpoint(services: ServicesDep, who: Auditor) -> CheckpointOut:
    """The newest signed checkpoint of the tenant's log (signed now if entries are newer)."""
    log = services.audit
    cp = log.checkpoint_now(who.tenant_id)
    cosigs = log.cosignatures(cp.log_id, cp.size).get(cp.size, [])
    return CheckpointOut(
        log_id=cp.log_id,
        origin=log.origin(cp.log_id),
        size=cp.size,
        root_hash=base64.b64encode(cp.root_hash).decode(),
        note=cp.note,
        key_name=log.keys.key_name,
        created_at=cp.created_at,
        cosignatures=cosigs,
        cosigned_note=cp.note + "".join(cosigs),
    )


@router.get(
    "/audit/export",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {}}}},
)
def export(
    services: ServicesDep,
    who: Auditor,
    start: Annotated[
        int, Query(alias="from", ge=0, le=MAX_SEQ, description="First seq (inclusive).")
    ] = 0,
    end: Annotated[
        int | None,
        Query(alias="to", ge=0, le=MAX_SEQ, description="End seq (exclusive); default: all."),
    ] = None,
    since: Annotated[
        int | None, Query(ge=0, le=MAX_SEQ, description="A tree size you hold a checkpoint for.")
    ] = None,
) -> StreamingResponse:
    """The export of ``from <= seq < to`` as JSON Lines, input of ``sandboxsec audit verify``.

    The read is itself audited first (fail closed), so the export includes its own record.
    """
    services.audit.append(
        AuditRecord(
            event=AuditEvent.AUDIT_EXPORT,
            tenant_id=who.tenant_id,
            actor_key_id=who.key_id,
            actor_role=str(who.role),
            outcome="success",
            body={"from": start, "to": end, "since": since},
        )
    )
    lines = services.audit.export(who.tenant_id, start=start, end=end, since=since)
    return StreamingResponse(
        lines,
        media_type="application/x-ndjson",
        headers={"Content-Disposition": f'attachment; filename="audit-{who.tenant_id}.jsonl"'},
    )


@router.get("/audit/keys", response_model=AuditKeyOut)
def keys(services: ServicesDep, who: Auditor) -> AuditKeyOut:
    """The checkpoint signing key (compare it with the copy you received out of band)."""
    k = services.audit.keys
    return AuditKeyOut(
        key_name=k.key_name,
        key_id_hex=key_id(k.key_name, k.public_key).hex(),
        public_key_pem=k.public_pem(),
        verifier_key=k.verifier_key(),
    )


@router.get("/audit/proof", response_model=InclusionOut)
def inclusion(
    services: ServicesDep,
    who: Auditor,
    seq: Annotated[int, Query(ge=0, le=MAX_SEQ)],
    size: Annotated[
        int | None, Query(ge=1, le=MAX_SEQ, description="A checkpoint size; default newest.")
    ] = None,
) -> InclusionOut:
    """Entry ``seq`` with its inclusion proof in a signed checkpoint (verifies offline)."""
    return InclusionOut(**services.audit.inclusion(who.tenant_id, seq, size))


@router.get("/audit/consistency", response_model=ConsistencyOut)
def consistency(
    services: ServicesDep,
    who: Auditor,
    first: Annotated[int, Query(ge=0, le=MAX_SEQ)],
    second: Annotated[int, Query(ge=0, le=MAX_SEQ)],
) -> ConsistencyOut:
    """A consistency proof between two stored checkpoints of the tenant's log."""
    return ConsistencyOut(**services.audit.consistency(who.tenant_id, first, second))


@router.post("/audit/hash", response_model=HashOut)
def hash_value(body: HashIn, services: ServicesDep, who: Auditor) -> HashOut:
    """The HMAC ``value`` has in this tenant's log, to find entries that mention it."""
    return HashOut(hmac=services.audit.hash_value(who.tenant_id, body.value))
