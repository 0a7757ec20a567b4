"""Routes: encrypted trajectory records of a session.

The agent of a session writes records; an admin of the same tenant reads them decrypted.
Every read is audited before the data leaves the service.  Another tenant's session or record
is 404, exactly like one that does not exist.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from sandboxsec.api.deps import ServicesDep, require
from sandboxsec.api.session_proof import ProofDep
from sandboxsec.encoding import b64decode_strict
from sandboxsec.errors import InputError
from sandboxsec.principal import Principal
from sandboxsec.sessions.binding import Claim
from sandboxsec.trajectory.views import RecordView, StoredRecord

__all__ = ["router"]

router = APIRouter(tags=["trajectory"])

_KIND_PATTERN = r"^[a-z][a-z0-9_.-]{0,63}$"


class TrajectoryRecordIn(BaseModel):
    """One record: its kind (kept in clear), free metadata and data (both encrypted)."""

    kind: str = Field(pattern=_KIND_PATTERN, examples=["action", "observation", "screenshot"])
    data: str = Field(description="The record's bytes, base64 (standard alphabet).")
    meta: dict[str, Any] = Field(default_factory=dict, description="Encrypted like the data.")


class TrajectoryRecordCreated(BaseModel):
    """The stored record's id and its clear (searchable) metadata."""

    record_id: str
    session_id: str
    kind: str
    size: int
    content_sha256: str = Field(description="SHA-256 of the data sent (computed in memory for "
                                "this answer; never stored)")
    created_at: datetime
    content_hmac: str = Field(default="", description="The keyed digest that is stored and "
                              "audited (HMAC-SHA256 under the tenant's digest key)")
    seq: int | None = Field(default=None, description="Position in the session, from 0")


class TrajectoryRecordOut(BaseModel):
    """A decrypted record."""

    record_id: str
    session_id: str
    kind: str
    size: int
    content_sha256: str
    created_at: datetime
    created_by: str = Field(description="Key id of the agent that wrote it.")
    meta: dict[str, Any]
    data: str = Field(description="base64 (standard alphabet)")
    content_hmac: str = Field(default="", description="The stored keyed digest (\"\" for "
                              "records from before keyed digests)")
    seq: int | None = Field(default=None, description="Position in the session, from 0 "
                            "(null for records from before authenticated order)")


class TrajectoryPage(BaseModel):
    """Records oldest first; pass ``next_after`` as ``after`` for the next page."""

    records: list[TrajectoryRecordOut]
    next_after: str | None


def _out(view: RecordView) -> TrajectoryRecordOut:
    return TrajectoryRecordOut(
        record_id=view.record_id, session_id=view.session_id, kind=view.kind, size=view.size,
        content_sha256=view.content_sha256, created_at=view.created_at,
        created_by=view.created_by, meta=view.meta,
        data=base64.b64encode(view.data).decode("ascii"),
        content_hmac=view.content_hmac, seq=view.seq,
    )


@router.post("/sessions/{session_id}/trajectory", status_code=201,
             response_model=TrajectoryRecordCreated)
def write_record(
    session_id: str,
    body: TrajectoryRecordIn,
    services: ServicesDep,
    who: Annotated[Principal, Depends(require("trajectory:write"))],
    proof: ProofDep,
) -> TrajectoryRecordCreated:
    """Store one record encrypted under the tenant's keys (refused, not truncated, if too big).

    The request carries a ``DPoP`` proof by the session's TPM-held key, checked first."""
    def write(claim: Claim) -> StoredRecord:
        # Checked on the encoded length first, so an oversized body is never decoded.
        services.trajectory.check_size(who, session_id, body.kind, len(body.data) // 4 * 3 - 2)
        try:
            data = b64decode_strict(body.data)
        except ValueError:
            raise InputError("data is not canonical base64 (standard alphabet)") from None
        return services.trajectory.write(who, session_id, body.kind, data, body.meta,
                                         claim=claim)

    # The proof's single-use mark commits in the record's own transaction.
    stored = services.session_binding.acting(who, proof, session_id, write)
    return TrajectoryRecordCreated(
        record_id=stored.record_id, session_id=stored.session_id, kind=stored.kind,
        size=stored.size, content_sha256=stored.content_sha256, created_at=stored.created_at,
        content_hmac=stored.content_hmac, seq=stored.seq,
    )


@router.get("/sessions/{session_id}/trajectory", response_model=TrajectoryPage)
def list_records(
    session_id: str,
    services: ServicesDep,
    who: Annotated[Principal, Depends(require("trajectory:read"))],
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(max_length=40)] = None,
    kind: Annotated[str | None, Query(pattern=_KIND_PATTERN)] = None,
) -> TrajectoryPage:
    """The session's records decrypted (only ``kind`` if given), oldest first; each record
    read is audited."""
    views = services.trajectory.list(who, session_id, limit=limit, after=after, kind=kind)
    return TrajectoryPage(
        records=[_out(v) for v in views],
        next_after=views[-1].record_id if len(views) == limit else None,
    )


@router.get("/sessions/{session_id}/trajectory/{record_id}", response_model=TrajectoryRecordOut)
def read_record(
    session_id: str,
    record_id: str,
    services: ServicesDep,
    who: Annotated[Principal, Depends(require("trajectory:read"))],
) -> TrajectoryRecordOut:
    """One record decrypted; the read is audited."""
    return _out(services.trajectory.read(who, session_id, record_id))


@router.get(
    "/sessions/{session_id}/trajectory/{record_id}/data",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def read_record_data(
    session_id: str,
    record_id: str,
    services: ServicesDep,
    who: Annotated[Principal, Depends(require("trajectory:read"))],
) -> StreamingResponse:
    """The record's raw bytes, decrypted segment by segment (for large screenshots and
    recordings); audited before the first byte.  A tampered segment aborts the transfer."""
    chunks = services.trajectory.iter_data(who, session_id, record_id)
    # Pull the first chunk now, so lookup, key and audit errors become proper error answers.
    first = next(chunks, b"")

    def body() -> Iterator[bytes]:
        yield first
        yield from chunks

    return StreamingResponse(body(), media_type="application/octet-stream")
