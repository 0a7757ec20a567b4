"""A C2SP tlog-witness: cosigns a log's checkpoint only if it extends what it cosigned before.

Run by a party independent of the service (``sandboxsec witness serve``), with its own Ed25519
key and its own state.  For each log origin it remembers the newest checkpoint it cosigned
(size, root and the whole log-signed note as evidence) and answers ``add-checkpoint``:

0. Parse: ``old N``, at most 63 base64 proof lines, a blank line, a signed checkpoint (400).
1. The origin must belong to a trusted log (404).
2. A signature by that log's key must verify (403).
3. ``old`` must not exceed the checkpoint's size (400).
4. Compare and swap, atomically with persisting: ``old`` must be the size last cosigned (409
   with that size); at equal size the root must be the one held (409, a fork); otherwise the
   consistency proof from the held tree must verify (422).  The new state is on disk before
   any cosignature leaves.
5. Cosign a re-encoding of the parsed checkpoint with the current time.

Everything except :class:`FileWitnessStore` is pure; the HTTP edge is ``sandboxsec.cli.witness``.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sandboxsec.audit.checkpoint import (
    Checkpoint,
    parse_signed_checkpoint,
    verify_signed_checkpoint,
)
from sandboxsec.audit.cosignature import WitnessKey, cosign
from sandboxsec.audit.errors import (
    AuditVerificationError,
    WitnessForkError,
    WitnessOriginUnknownError,
    WitnessProofInvalidError,
    WitnessRequestMalformedError,
    WitnessSignatureUntrustedError,
    WitnessSizeConflictError,
)
from sandboxsec.audit.merkle import HASH_SIZE, verify_consistency
from sandboxsec.encoding import b64decode_strict
from sandboxsec.statefiles import replace_private

__all__ = [
    "EMPTY_ROOT",
    "MAX_BODY_BYTES",
    "AddCheckpoint",
    "FileWitnessStore",
    "TrustedLog",
    "Witness",
    "WitnessRecord",
    "WitnessStore",
    "parse_add_checkpoint",
]

#: RFC 6962 root of the empty tree.
EMPTY_ROOT = hashlib.sha256(b"").digest()
#: A request is one small note and at most 63 hashes; anything larger is refused unread.
MAX_BODY_BYTES = 64 * 1024
_MAX_PROOF = 63
_OLD_LINE = re.compile(r"old (0|[1-9][0-9]{0,18})")
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class AddCheckpoint:
    """A parsed add-checkpoint request."""

    old_size: int
    proof: tuple[bytes, ...]
    note: str
    checkpoint: Checkpoint


def parse_add_checkpoint(body: bytes) -> AddCheckpoint:
    """Step 0: parse the request body or raise :class:`WitnessRequestMalformedError`."""
    if len(body) > MAX_BODY_BYTES:
        raise WitnessRequestMalformedError("the request body is too large")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WitnessRequestMalformedError("the request body is not UTF-8") from exc
    if _CONTROL.search(text):
        raise WitnessRequestMalformedError("the request body holds control characters")
    head, sep, note = text.partition("\n\n")
    if not sep:
        raise WitnessRequestMalformedError("the request has no blank line before the checkpoint")
    lines = head.split("\n")
    m = _OLD_LINE.fullmatch(lines[0])
    if m is None:
        raise WitnessRequestMalformedError("the first line is not 'old <size>'")
    if len(lines) - 1 > _MAX_PROOF:
        raise WitnessRequestMalformedError("more than 63 consistency proof lines")
    proof = []
    for line in lines[1:]:
        try:
            h = b64decode_strict(line)
        except (binascii.Error, ValueError) as exc:
            raise WitnessRequestMalformedError("a proof line is not base64") from exc
        if len(h) != HASH_SIZE:
            raise WitnessRequestMalformedError("a proof line is not a SHA-256 hash")
        proof.append(h)
    try:
        checkpoint, _ = parse_signed_checkpoint(note)
    except AuditVerificationError as exc:
        raise WitnessRequestMalformedError(f"the checkpoint is malformed: {exc.message}") from exc
    if note.partition("\n\n")[0].count("\n") != 2:
        # Extension lines would be cosigned without being understood; the logs witnessed here
        # never write them.
        raise WitnessRequestMalformedError("the checkpoint has extension lines")
    return AddCheckpoint(int(m.group(1)), tuple(proof), note, checkpoint)


@dataclass(frozen=True, slots=True)
class TrustedLog:
    """A log the witness watches: its checkpoint key and the origins it signs for.

    sandboxsec signs one log per tenant under one key, with origins ``<key name>/<log id>``, so
    a trusted log covers every origin starting with ``origin_prefix``.
    """

    key_name: str
    public_key: Ed25519PublicKey
    origin_prefix: str

    def covers(self, origin: str) -> bool:
        """Whether ``origin`` is one of this log's."""
        return origin.startswith(self.origin_prefix) and len(origin) > len(self.origin_prefix)


@dataclass(frozen=True, slots=True)
class WitnessRecord:
    """What the witness holds for one origin: the newest tree it cosigned, and its note."""

    size: int
    root_hash: bytes
    note: str

    def to_json(self) -> dict[str, object]:
        return {"size": self.size, "root": base64.b64encode(self.root_hash).decode(),
                "note": self.note}

    @classmethod
    def from_json(cls, value: dict[str, object]) -> WitnessRecord:
        size, root, note = value["size"], value["root"], value["note"]
        if not isinstance(size, int) or not isinstance(root, str) or not isinstance(note, str):
            raise ValueError("a witness state record is malformed")
        return cls(size, b64decode_strict(root), note)


class WitnessStore(Protocol):
    """Per-origin state with an atomic read-check-write."""

    def update(
        self, origin: str, decide: Callable[[WitnessRecord | None], WitnessRecord]
    ) -> WitnessRecord:
        """Call ``decide`` with the current record under a lock, persist what it returns
        durably, then return it.  An exception from ``decide`` leaves the state unchanged."""
        ...

    def get(self, origin: str) -> WitnessRecord | None:
        """The current record of ``origin``."""
        ...


class Witness:
    """The witness's decision procedure (see the module docstring for the numbered steps)."""

    def __init__(
        self,
        *,
        name: str,
        private_key: Ed25519PrivateKey,
        logs: Sequence[TrustedLog],
        store: WitnessStore,
        now: Callable[[], int],
    ) -> None:
        if not logs:
            raise ValueError("a witness with no trusted log would cosign nothing")
        self.key = WitnessKey.from_private(name, private_key)
        self._private = private_key
        self._logs = list(logs)
        self._store = store
        self._now = now

    def add_checkpoint(self, body: bytes) -> str:
        """Answer one add-checkpoint request: the cosignature line, or a ``Witness*Error``."""
        # 0. Parse.
        req = parse_add_checkpoint(body)
        cp = req.checkpoint
        # 1. A log we witness.
        logs = [log for log in self._logs if log.covers(cp.origin)]
        if not logs:
            raise WitnessOriginUnknownError(f"no trusted log has origin {cp.origin!r}")
        # 2. Signed by its key (signatures by other keys are ignored).
        if not any(self._signed_by(req.note, log) for log in logs):
            raise WitnessSignatureUntrustedError("no signature by a trusted log key verifies")
        # 3. The old size is not beyond the new one.
        if req.old_size > cp.size:
            raise WitnessRequestMalformedError("the old size is larger than the checkpoint size")

        # 4. Compare and swap, persisted before we answer.
        def decide(current: WitnessRecord | None) -> WitnessRecord:
            held = current.size if current is not None else 0
            if req.old_size != held:
                raise WitnessSizeConflictError(
                    f"the witness holds size {held}, not {req.old_size}", size=held
                )
            if req.old_size == 0 and req.proof:
                raise WitnessRequestMalformedError("a proof from size 0 must be empty")
            if current is None or current.size == 0:
                if cp.size == 0 and cp.root_hash != EMPTY_ROOT:
                    raise WitnessProofInvalidError("an empty tree has another root")
            elif req.old_size == cp.size:
                if cp.root_hash != current.root_hash:
                    raise WitnessForkError(
                        f"a second root for size {cp.size} of {cp.origin}: the log forked"
                    )
                if req.proof:
                    raise WitnessRequestMalformedError("a proof between equal sizes is empty")
            elif not verify_consistency(
                current.size, cp.size, current.root_hash, cp.root_hash, list(req.proof)
            ):
                raise WitnessProofInvalidError(
                    f"size {cp.size} does not extend the cosigned size {current.size}"
                )
            return WitnessRecord(cp.size, cp.root_hash, req.note)

        self._store.update(cp.origin, decide)
        # 5. Cosign what we parsed (never the raw bytes we were sent).
        return cosign(cp, name=self.key.name, private_key=self._private, timestamp=self._now())

    @staticmethod
    def _signed_by(note: str, log: TrustedLog) -> bool:
        try:
            verify_signed_checkpoint(note, log.public_key, name=log.key_name)
        except AuditVerificationError:
            return False
        return True


class FileWitnessStore:
    """The witness state as one JSON file (mode 0600), replaced atomically on each update.

    A thread lock and an ``flock`` on a sibling lock file make the read-check-write atomic
    across threads and processes sharing the file; the new file is fsynced and renamed into
    place (and the directory fsynced) before :meth:`update` returns.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lockfile = path.with_name(path.name + ".lock")

    def _read(self) -> dict[str, WitnessRecord]:
        try:
            raw = json.loads(self._path.read_bytes())
        except FileNotFoundError:
            return {}
        logs = raw.get("logs", {}) if isinstance(raw, dict) else None
        if not isinstance(logs, dict):
            raise ValueError(f"{self._path} is not a witness state file")
        return {origin: WitnessRecord.from_json(v) for origin, v in logs.items()}

    def get(self, origin: str) -> WitnessRecord | None:
        """The current record of ``origin``."""
        with self._lock:
            return self._read().get(origin)

    def update(
        self, origin: str, decide: Callable[[WitnessRecord | None], WitnessRecord]
    ) -> WitnessRecord:
        """See :meth:`WitnessStore.update`."""
        with self._lock:
            fd = os.open(self._lockfile, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                state = self._read()
                new = decide(state.get(origin))
                state[origin] = new
                self._write(state)
                return new
            finally:
                os.close(fd)

    def _write(self, state: dict[str, WitnessRecord]) -> None:
        data = json.dumps(
            {"format": "sandboxsec-witness-state/1",
             "logs": {o: r.to_json() for o, r in sorted(state.items())}},
            indent=1,
        ).encode()
        # Durable before the cosignature leaves: the witness must never forget what it signed.
        replace_private(self._path, data, durable=True)
