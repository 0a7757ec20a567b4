"""The audit log of one service as a single handle: the writer and the reader side by side.

:class:`AuditLog` holds no logic of its own: appends and checkpoint signing are the
:class:`~sandboxsec.audit.writer.AuditWriter`'s job, checkpoints, entries, exports and proofs
the :class:`~sandboxsec.audit.reader.AuditReader`'s.  The API and the CLI use this handle;
domain services get only an :class:`~sandboxsec.audit.sink.AuditSink` (the writer).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from sandboxsec.audit.keys import AuditKeys
from sandboxsec.audit.reader import AuditReader, StoredTree
from sandboxsec.audit.record import AuditReceipt, AuditRecord
from sandboxsec.audit.store import StoredCheckpoint, log_id_of
from sandboxsec.audit.writer import AuditWriter

__all__ = ["AuditLog", "StoredCheckpoint", "StoredTree", "log_id_of"]


class AuditLog:
    """The tamper-evident audit log of one service (all tenants' logs and the service log)."""

    def __init__(self, writer: AuditWriter, reader: AuditReader, keys: AuditKeys) -> None:
        self.writer = writer
        self.reader = reader
        self.keys = keys
        #: State files, alarms and witnesses (see :mod:`sandboxsec.audit.integrity`).
        self.guard = writer.guard

    def origin(self, log_id: str) -> str:
        """See :meth:`AuditReader.origin`."""
        return self.reader.origin(log_id)

    def append(self, record: AuditRecord, *, session: Any | None = None) -> AuditReceipt:
        """See :meth:`AuditWriter.append`."""
        return self.writer.append(record, session=session)

    def append_many(
        self, records: Sequence[AuditRecord], *, session: Any | None = None
    ) -> list[AuditReceipt]:
        """See :meth:`AuditWriter.append_many`."""
        return self.writer.append_many(records, session=session)

    def checkpoint_now(self, log_id: str, *, wait: bool = True) -> StoredCheckpoint:
        """See :meth:`AuditWriter.checkpoint_now`."""
        return self.writer.checkpoint_now(log_id, wait=wait)

    def cosignatures(self, log_id: str, size: int | None = None) -> dict[int, list[str]]:
        """See :meth:`AuditReader.cosignatures`."""
        return self.reader.cosignatures(log_id, size)

    def sign_due_checkpoints(self) -> int:
        """See :meth:`AuditWriter.sign_due_checkpoints`."""
        return self.writer.sign_due_checkpoints()

    def latest_checkpoint(self, log_id: str) -> StoredCheckpoint | None:
        """See :meth:`AuditReader.latest_checkpoint`."""
        return self.reader.latest_checkpoint(log_id)

    def tree(self, log_id: str, size: int) -> StoredTree:
        """See :meth:`AuditReader.tree`."""
        return self.reader.tree(log_id, size)

    def entry_lines(self, log_id: str, start: int, end: int) -> Iterator[bytes]:
        """See :meth:`AuditReader.entry_lines`."""
        return self.reader.entry_lines(log_id, start, end)

    def entries(
        self, log_id: str, *, event: str | None = None, start: int = 0, end: int | None = None
    ) -> list[dict[str, Any]]:
        """See :meth:`AuditReader.entries`."""
        return self.reader.entries(log_id, event=event, start=start, end=end)

    def hash_value(self, log_id: str, value: Any) -> str:
        """See :meth:`AuditReader.hash_value`."""
        return self.reader.hash_value(log_id, value)

    def size(self, log_id: str) -> int:
        """See :meth:`AuditReader.size`."""
        return self.reader.size(log_id)

    def export(
        self, log_id: str, *, start: int = 0, end: int | None = None, since: int | None = None
    ) -> Iterator[bytes]:
        """See :meth:`AuditReader.export`."""
        return self.reader.export(log_id, start=start, end=end, since=since)

    def inclusion(self, log_id: str, seq: int, size: int | None = None) -> dict[str, Any]:
        """See :meth:`AuditReader.inclusion`."""
        return self.reader.inclusion(log_id, seq, size)

    def consistency(self, log_id: str, first: int, second: int) -> dict[str, Any]:
        """See :meth:`AuditReader.consistency`."""
        return self.reader.consistency(log_id, first, second)

    def close(self) -> None:
        """Stop the group-commit writer (pending callers get their answer first)."""
        self.writer.close()
