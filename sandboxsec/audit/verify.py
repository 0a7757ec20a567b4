"""Offline verification of an audit export: trusts only the auditor's copy of the public key.

Pure: bytes and a key in, a frozen :class:`ExportReport` out, or an
:class:`~sandboxsec.audit.errors.AuditVerificationError` naming the first entry that fails.
The export format is described in :mod:`sandboxsec.audit.export` and docs/audit.md.

The entry loop hashes the stored line bytes directly and checks ``seq`` and ``prev`` by a
prefix comparison in one pass, so it never parses an entry as JSON; its cost is about twice
the raw SHA-256 of the lines (a leaf hash and a node hash per entry) plus one line split.

When the optional C extension :mod:`sandboxsec.audit._native` is built, that pass and the
reduction of the tree run in it (OpenSSL's SHA-256, no interpreter work per entry); it
computes exactly what :func:`_chunk` and :func:`~sandboxsec.audit.merkle.perfect_root`
compute, and every failure is still named by the Python checks below.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import importlib
import itertools
import json
import os
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, cast, overload

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sandboxsec.audit.checkpoint import (
    Checkpoint,
    verify_signed_checkpoint,
)
from sandboxsec.audit.cosignature import (
    Cosignature,
    WitnessKey,
    signature_lines,
    verify_cosignatures,
)
from sandboxsec.audit.entry import GENESIS_PREV, entry_prefix
from sandboxsec.audit.errors import (
    AuditChainBrokenError,
    AuditCheckpointInvalidError,
    AuditConsistencyError,
    AuditEntryMalformedError,
    AuditEntryOrderError,
    AuditExportMalformedError,
    AuditForkError,
    AuditInclusionError,
    AuditRootMismatchError,
    AuditUncoveredEntriesError,
    AuditVerificationError,
    AuditWitnessQuorumError,
)
from sandboxsec.audit.export import EXPORT_FORMAT
from sandboxsec.audit.merkle import (
    HASH_SIZE,
    Frontier,
    ProofError,
    leaf_hash,
    perfect_root,
    verify_consistency,
    verify_inclusion,
)
from sandboxsec.audit.witness_policy import WitnessPolicy
from sandboxsec.encoding import b64decode_strict


class _NativeHasher(Protocol):
    """sandboxsec/audit/_native.c: what :func:`_chunk` and ``perfect_root`` compute, in C."""

    def leaves(
        self, data: bytes, lo: int, hi: int, prefix: bytes, seq: int, prev: bytes, /
    ) -> tuple[bytes, bool]: ...

    def roots(self, hashes: memoryview, height: int, /) -> bytes: ...


def _load_native() -> _NativeHasher | None:
    """The C extension, built with the package when a C compiler and the libcrypto headers
    are present; None without it (the Python pass then does the same work)."""
    try:
        # By name: the import contracts see only Python modules, and would read a plain import
        # of this binary module as an import of the whole sandboxsec.audit package.
        module: Any = importlib.import_module("sandboxsec.audit._native")
    except ImportError:
        return None
    return cast(_NativeHasher, module)


_native = _load_native()

__all__ = [
    "EntryProofReport",
    "ExportReport",
    "implementation",
    "verify_entry_proof",
    "verify_export",
    "worker_count",
]

_PREV_FIELD = b',"prev":"'


@dataclass(frozen=True, slots=True)
class ExportReport:
    """What a successful verification established."""

    log_id: str
    origin: str
    first_seq: int
    end_seq: int
    entries: int
    checkpoints: int
    consistency_proofs: int
    tree_size: int
    root_hash: bytes
    #: Verified witness cosignatures of the newest checkpoint (the one ``tree_size`` names).
    cosignatures: tuple[Cosignature, ...] = ()
    #: Every checkpoint size seen, with the witnesses that cosigned it.
    witnessed: tuple[tuple[int, tuple[str, ...]], ...] = ()


def _b64_hashes(values: Any, what: str) -> list[bytes]:
    if not isinstance(values, list):
        raise AuditExportMalformedError(f"{what} is not a list")
    out = []
    for v in values:
        try:
            h = b64decode_strict(v)
        except (binascii.Error, ValueError, TypeError) as exc:
            raise AuditExportMalformedError(f"{what} holds a value that is not base64") from exc
        if len(h) != HASH_SIZE:
            raise AuditExportMalformedError(f"{what} holds a value that is not a SHA-256 hash")
        out.append(h)
    return out


def _json_line(line: bytes, where: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError as exc:
        raise AuditExportMalformedError(f"{where} is not JSON") from exc
    if not isinstance(value, dict):
        raise AuditExportMalformedError(f"{where} is not a JSON object")
    return value


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise AuditExportMalformedError(f"{what} is not a non-negative integer")
    return value


def _origin_names_log(origin: str, log_id: str) -> bool:
    return origin.rsplit("/", 1)[-1] == log_id


def verify_export(
    data: bytes,
    public_key: Ed25519PublicKey,
    *,
    key_name: str | None = None,
    expected_log: str | None = None,
    previous_checkpoints: Sequence[str] = (),
    witnesses: Sequence[WitnessKey] = (),
    min_witnesses: int = 0,
    now: int | None = None,
    policy: WitnessPolicy | None = None,
    workers: int | None = None,
) -> ExportReport:
    """Verify an export end to end; see docs/audit.md ("Verifying an export").

    ``previous_checkpoints`` are signed notes the auditor kept from earlier audits: each must
    verify, agree with any checkpoint of the same size (else a fork) and be consistent with the
    export (by recomputation when its size is covered, else by a consistency proof in the file).
    ``witnesses`` are the witness keys the auditor trusts: every cosignature claiming one of
    them must verify, and the newest checkpoint must carry at least ``min_witnesses`` of them
    (``now``, POSIX seconds, refuses cosignatures dated later).  A C2SP tlog-``policy`` adds
    its witnesses and must be satisfied by the newest checkpoint's cosignatures too.

    ``workers`` hash the entries of a large export (None: one per available core when the
    export is large; 1: none): threads with the native hasher (it releases the GIL), else
    processes, forked only when the calling process runs no other thread.  They only speed up
    an export that verifies: any failure is named by the one-pass checks.
    """
    if policy is not None:
        witnesses = [*witnesses, *policy.keys]
    if min_witnesses > len({w.name for w in witnesses}):
        # An empty (or too small) witness list can never meet the quorum: deny, loudly.
        raise AuditWitnessQuorumError(
            f"{min_witnesses} witness cosignatures are required but only "
            f"{len({w.name for w in witnesses})} witness keys were given"
        )
    if b"\r" in data:
        # Canonical lines never hold a raw CR (JSON escapes it): the file was re-encoded,
        # e.g. to CRLF line endings, and no longer hashes to what was signed.
        raise AuditExportMalformedError(
            "the export contains carriage returns (line endings changed?); use the file as "
            "downloaded, byte for byte"
        )
    lines, entries_at = _lines_before_entries(data)
    if not lines:
        raise AuditExportMalformedError("the export is empty")

    # 1. The header names the log, the range and the tree before the range.
    header = _json_line(lines[0], "the header line")
    if header.get("type") != "header" or header.get("format") != EXPORT_FORMAT:
        raise AuditExportMalformedError(f"the first line is not a {EXPORT_FORMAT} header")
    log_id, origin = header.get("log_id"), header.get("origin")
    if not isinstance(log_id, str) or not isinstance(origin, str) or not log_id:
        raise AuditExportMalformedError("the header has no log id or origin")
    if not _origin_names_log(origin, log_id):
        raise AuditExportMalformedError("the header's origin does not name its log")
    if expected_log is not None and log_id != expected_log:
        raise AuditExportMalformedError(f"the export is for log {log_id!r}, not {expected_log!r}")
    start = _int(header.get("from"), "from")
    end = _int(header.get("to"), "to")
    if end < start:
        raise AuditExportMalformedError("the header's range ends before it starts")
    try:
        frontier = Frontier(start, _b64_hashes(header.get("frontier", []), "the frontier"))
    except ProofError as exc:
        raise AuditExportMalformedError(str(exc)) from exc
    prev_text = header.get("prev_leaf")
    if start == 0:
        prev_hex = GENESIS_PREV.encode()
    elif isinstance(prev_text, str) and len(prev_text) == 2 * HASH_SIZE:
        prev_hex = prev_text.encode()
    else:
        raise AuditExportMalformedError("the header has no prev_leaf for a range after 0")

    prefix = entry_prefix(log_id)
    # The entry lines run from entries_at to stop (a final newline ends the last one).
    stop = len(data) - 1 if data.endswith(b"\n") else len(data)
    # Worker threads (native hasher) start on the entries now and are joined at step 5:
    # the checkpoint and cosignature checks run meanwhile.
    entry_workers = _parallel_entries(data, entries_at, stop, prefix, start, prev_hex,
                                      worker_count(workers, len(data) - entries_at))
    try:
        # 2. Checkpoint and proof lines come before the entries.
        idx = 1
        notes: list[str] = []
        cosig_lines: list[list[str]] = []
        proofs: dict[tuple[int, int], list[bytes]] = {}
        while idx < len(lines):
            rec = _json_line(lines[idx], f"line {idx + 1}")
            kind = rec.get("type")
            if kind == "checkpoint" and isinstance(rec.get("note"), str):
                notes.append(rec["note"])
                extra = rec.get("cosignatures", [])
                if not isinstance(extra, list) or not all(isinstance(x, str) for x in extra):
                    raise AuditExportMalformedError(f"line {idx + 1} has malformed cosignatures")
                cosig_lines.append(extra)
            elif kind == "consistency":
                a, b = _int(rec.get("first"), "first"), _int(rec.get("second"), "second")
                proofs[(a, b)] = _b64_hashes(rec.get("proof"), "a consistency proof")
            else:
                raise AuditExportMalformedError(f"line {idx + 1} is not a checkpoint or proof")
            idx += 1

        # 3. Every checkpoint must carry a valid signature by the trusted key for this log.
        by_size: dict[int, Checkpoint] = {}
        # Each note is parsed and its signature checked once; the witness step reuses the result.
        admitted: dict[str, Checkpoint] = {}

        def admit(note: str) -> None:
            cp = admitted.get(note)
            if cp is None:
                cp = admitted[note] = verify_signed_checkpoint(
                    note, public_key, origin=origin, name=key_name
                )
            seen = by_size.get(cp.size)
            # 4. Two signed checkpoints of one size with different roots are a fork.
            if seen is not None and seen.root_hash != cp.root_hash:
                raise AuditForkError(
                    f"two signed checkpoints of size {cp.size} have different roots: the log forked"
                )
            by_size[cp.size] = cp

        for note in notes:
            admit(note)
        exported_sizes = sorted(by_size)
        # 3b. Every cosignature claiming a trusted witness must verify (others are ignored).
        cosigned: dict[int, list[Cosignature]] = {}
        if witnesses:
            for note, extra in zip(notes, cosig_lines, strict=True):
                cp = admitted[note]
                sig_lines = signature_lines(note.partition("\n\n")[2]) + list(extra)
                for c in verify_cosignatures(cp, sig_lines, witnesses, not_after=now):
                    have = cosigned.setdefault(cp.size, [])
                    if c.witness not in {h.witness for h in have}:
                        have.append(c)
        for note in previous_checkpoints:
            admit(note)
        sizes = sorted(by_size)

        # 5. Recompute every leaf in order, follow the hash chain and match the covered roots.
        targets = [s for s in sizes if start <= s <= end]
        if start in by_size and frontier.root() != by_size[start].root_hash:
            raise AuditRootMismatchError(
                f"the tree before entry {start} does not match the checkpoint of size {start}",
                seq=start,
            )
        # The entry lines are split only if a check has to name a failing entry.
        entries = functools.cache(lambda: _entry_lines(data, entries_at))
        fast = entry_workers.result()
        blocks: dict[int, bytes] = {}
        leaves: Sequence[bytes]
        if fast is not None:
            # Every head and link held in the workers; roots are checked below, and a root that
            # does not match is diagnosed on the lines split here.
            leaves, blocks = fast
            linked = True
        elif entries_at < len(data):
            # Every leaf hash, and every entry's sequence number and prev link, always, in one
            # pass over the exact line bytes: a checkpoint signed over a broken chain (a past
            # rewritten before the service signed it) is still named.
            leaves, linked = _leaf_pass(data, entries_at, stop, prefix, start, prev_hex)
        else:
            leaves, linked = [], True
        count = len(leaves)
        if not linked:
            # Name the first bad entry exactly as the separate checks do: heads first (a line of
            # another log, a gap, a reordering), then roots, then links.
            _check_heads(entries(), prefix, start, prev_hex)
        _walk_entries(entries, leaves, blocks, prefix, start, prev_hex, frontier, targets, by_size)
        if not linked:
            _check_links(entries(), leaves, prefix, start, prev_hex)
        covered = targets[-1] if targets else start
        last_end = start + count
        if last_end > covered:
            raise AuditUncoveredEntriesError(
                f"entries {covered}..{last_end - 1} are not covered by a signed checkpoint",
                seq=covered,
            )
        if last_end != end:
            raise AuditEntryOrderError(
                f"the header promises entries up to {end - 1}, the file ends at {last_end - 1}",
                seq=last_end,
            )
        # 6. Consecutive exported checkpoints are linked by a verifying consistency proof.
        checked_proofs = 0
        for a, b in itertools.pairwise(exported_sizes):
            _check_consistency(by_size[a], by_size[b], proofs.get((a, b)))
            checked_proofs += 1
        # 7. A kept checkpoint the entries do not cover must be linked to the export by a proof.
        for kept in sorted({s for s in sizes if s not in exported_sizes and not start <= s <= end}):
            later = [s for s in exported_sizes if s >= kept]
            if not later:
                raise AuditConsistencyError(
                    f"the export does not reach the kept checkpoint of size {kept}; export up to it"
                )
            nxt = later[0]
            _check_consistency(by_size[kept], by_size[nxt], proofs.get((kept, nxt)))
            checked_proofs += 1

        top = by_size[targets[-1]] if targets else (by_size[sizes[-1]] if sizes else None)
        # 8. The witness quorum on the newest checkpoint: it covers every entry before it, through
        #    the recomputed roots and the consistency proofs checked above.
        top_cosigs = tuple(cosigned.get(top.size, [])) if top is not None else ()
        if policy is not None and not policy.satisfied({c.witness for c in top_cosigs}):
            raise AuditWitnessQuorumError(
                f"the cosignatures on the checkpoint of size {top.size if top else 0} "
                f"({', '.join(sorted(c.witness for c in top_cosigs)) or 'none'}) do not meet the "
                "policy's quorum"
            )
        if min_witnesses and len(top_cosigs) < min_witnesses:
            size = top.size if top is not None else 0
            raise AuditWitnessQuorumError(
                f"the checkpoint of size {size} has {len(top_cosigs)} valid witness cosignatures, "
                f"{min_witnesses} are required: no quorum of independent witnesses saw this tree",
                seq=None,
            )
        return ExportReport(
            log_id=log_id,
            origin=origin,
            first_seq=start,
            end_seq=end,
            entries=count,
            checkpoints=len(exported_sizes),
            consistency_proofs=checked_proofs,
            tree_size=top.size if top else 0,
            root_hash=top.root_hash if top else b"",
            cosignatures=top_cosigs,
            witnessed=tuple(
                (size, tuple(c.witness for c in cosigned.get(size, []))) for size in exported_sizes
            ),
        )
    finally:
        entry_workers.wait()


def _lines_before_entries(data: bytes) -> tuple[list[bytes], int]:
    """The header line and the checkpoint and proof lines after it (all lines up to the first
    that starts like an entry), and the offset where the entries start.

    The same lines ``data.split(b"\\n")`` gives, without splitting the (large) entry part.
    """
    out: list[bytes] = []
    pos, n = 0, len(data)
    while pos < n:
        if out and data.startswith(b'{"v":', pos):
            break
        j = data.find(b"\n", pos)
        if j < 0:
            j = n
        out.append(data[pos:j])
        pos = j + 1
    return out, min(pos, n)


def _entry_lines(data: bytes, at: int) -> list[bytes]:
    """The entry lines from offset ``at`` (a final newline ends the last line)."""
    if at >= len(data):
        return []
    lines = data[at:].split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return lines


#: Below this many bytes of entries, starting processes costs more than it saves.
_PARALLEL_MIN_BYTES = 16 << 20
#: The same for threads (the native hasher): a thread starts in tens of microseconds.
_THREADS_MIN_BYTES = 1 << 20
_MAX_WORKERS = 8


def implementation() -> str:
    """``"native"`` when the entries are hashed by the C extension, else ``"python"``."""
    return "python" if _native is None else "native"


def worker_count(requested: int | None, nbytes: int) -> int:
    """How many workers :func:`verify_export` uses for ``nbytes`` of entries when asked for
    ``requested`` (None: the default): threads with the native hasher, else processes."""
    if requested is not None:
        want = max(1, requested)
    elif nbytes < (_PARALLEL_MIN_BYTES if _native is None else _THREADS_MIN_BYTES):
        return 1
    else:
        affinity = getattr(os, "sched_getaffinity", None)
        want = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
    # A process that runs other threads is never forked: a lock one of them holds would stay
    # held forever in the child.  Threads (the native hasher) have no such hazard.
    if want > 1 and _native is None and (
        not hasattr(os, "fork") or threading.active_count() > 1
    ):
        return 1
    return min(want, _MAX_WORKERS)


class _Hashes(Sequence[bytes]):
    """32-byte hashes held back to back, as the native pass returns them: a hash becomes its
    own bytes object only when a check asks for it, and subtrees are reduced from the blob."""

    __slots__ = ("view",)

    def __init__(self, blob: bytes | memoryview) -> None:
        self.view = memoryview(blob)

    def __len__(self) -> int:
        return len(self.view) // HASH_SIZE

    @overload
    def __getitem__(self, i: int) -> bytes: ...

    @overload
    def __getitem__(self, i: slice) -> list[bytes]: ...

    def __getitem__(self, i: int | slice) -> bytes | list[bytes]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError("hash index out of range")
        i %= n
        return bytes(self.view[i * HASH_SIZE : (i + 1) * HASH_SIZE])

    def span(self, lo: int, hi: int) -> _Hashes:
        """The hashes ``lo..hi`` without copying them."""
        return _Hashes(self.view[lo * HASH_SIZE : hi * HASH_SIZE])

    def root(self, i: int, height: int) -> bytes:
        """The root of the perfect subtree over hashes ``i .. i + 2**height``."""
        return self.roots(i, 1, height)

    def roots(self, i: int, count: int, height: int) -> bytes:
        """The roots of ``count`` consecutive perfect subtrees of height ``height`` from hash
        ``i``, concatenated."""
        assert _native is not None  # a _Hashes only exists when the native pass ran
        width = HASH_SIZE << height
        return _native.roots(self.view[i * HASH_SIZE : i * HASH_SIZE + count * width], height)


#: The native pass counts sequence numbers in 64 bits: a range a (hostile) header places
#: beyond that is checked in Python.
_NATIVE_SEQ_LIMIT = 1 << 63


def _leaf_pass(
    data: bytes, lo: int, hi: int, prefix: bytes, seq: int, prev: bytes
) -> tuple[Sequence[bytes], bool]:
    """What :func:`_chunk` returns, from the native pass when it is built (it reads ``data``
    without the GIL, so only an immutable ``bytes`` is handed to it)."""
    if _native is not None and type(data) is bytes and seq + (hi - lo) < _NATIVE_SEQ_LIMIT:
        blob, ok = _native.leaves(data, lo, hi, prefix, seq, prev)
        return _Hashes(blob), ok
    return _chunk(data, lo, hi, prefix, seq, prev)


def _chunk(
    data: bytes, lo: int, hi: int, prefix: bytes, seq: int, prev: bytes
) -> tuple[list[bytes], bool]:
    """Leaf hashes of the entry lines in ``data[lo:hi]``, and whether every one starts
    ``{"v":1,"log":<log>,"seq":<next from seq>,"prev":"<hex of the previous leaf>`` (``prev``
    for the first; the caller names a failure).

    One pass over the lines in place: no copy of them is made (on a large export, allocating
    and filling those copies cost as much as hashing them).
    """
    view = memoryview(data)
    seeded = hashlib.sha256(b"\x00")  # copied per entry: RFC 9162's leaf prefix absorbed once
    fmt = prefix.replace(b"%", b"%%") + b'%d,"prev":"%b'
    find, starts, hexlify = data.find, data.startswith, binascii.hexlify
    leaves: list[bytes] = []
    append = leaves.append
    ok = True
    pos = lo
    while True:
        j = find(b"\n", pos, hi)
        if j < 0:
            j = hi
        h = seeded.copy()
        h.update(view[pos:j])
        leaf = h.digest()
        append(leaf)
        if ok and not starts(fmt % (seq, prev), pos, j):
            ok = False
        prev = hexlify(leaf)
        seq += 1
        if j >= hi:
            return leaves, ok
        pos = j + 1


#: Workers also reduce the aligned subtrees of this height inside their share, so the tree is
#: built from their roots (a 256th of the node hashes) rather than from every leaf.
_BLOCK_HEIGHT = 8
_HEAD = struct.Struct(">QQBQQ")


class _Share(NamedTuple):
    """One worker's report on its share of the entry lines."""

    #: The sequence number its heads were checked against: read from its first line, so the
    #: caller confirms it is ``start`` plus the count of the lines before (else: no verdict).
    seq: int
    entries: int
    #: Whether every head and link in the share held.
    ok: bool
    #: Index of its first whole block of 2**_BLOCK_HEIGHT leaves.
    first_block: int
    leaves: bytes
    roots: bytes


def _claimed_seq(data: bytes, lo: int, prefix: bytes) -> int | None:
    """The sequence number the line at ``lo`` claims, when it reads as one."""
    if not data.startswith(prefix, lo):
        return None
    at = lo + len(prefix)
    text = data[at : data.find(b",", at, at + 21)]
    # ASCII digits only, at most 20 (bytes.isdigit is ASCII-only), and within 64 bits.
    return int(text) if text.isdigit() and int(text) < _NATIVE_SEQ_LIMIT else None


def _share(
    data: bytes, at: int, lo: int, hi: int, prefix: bytes, start: int, first_prev: bytes
) -> _Share:
    """One worker's report on the entry lines in ``data[lo:hi]`` (the entries start at
    ``at``): how many, whether their heads and links hold, and their leaf hashes and the roots
    of the aligned blocks of 2**_BLOCK_HEIGHT leaves wholly inside the share.

    A later share checks its heads against the number its first line claims (counting the
    lines before it would hold the GIL over half the file); :meth:`_EntryWorkers.result`
    accepts the shares only when each claim is the count of the lines before it.
    """
    if lo == at:
        seq, prev = start, first_prev
    else:
        claimed = _claimed_seq(data, lo, prefix)
        if claimed is None:
            return _Share(0, 0, False, 0, b"", b"")
        before = data.rfind(b"\n", at, lo - 1) + 1 or at
        seq, prev = claimed, binascii.hexlify(leaf_hash(data[before : lo - 1]))
    leaves, ok = _leaf_pass(data, lo, hi, prefix, seq, prev)
    width = 1 << _BLOCK_HEIGHT
    first_block = -(-seq // width)
    k = first_block * width - seq
    m = max(0, (seq + len(leaves)) // width - first_block)
    if isinstance(leaves, _Hashes):
        blob = leaves.view.tobytes()
        roots = leaves.roots(k, m, _BLOCK_HEIGHT)
    else:
        blob = b"".join(leaves)
        roots = b"".join(perfect_root(leaves[k + b * width : k + (b + 1) * width])
                         for b in range(m))
    return _Share(seq, len(leaves), ok, first_block, blob, roots)


@dataclass(frozen=True, slots=True)
class _EntryWorkers:
    """The workers' pass over the entries: threads are already running (the native pass
    releases the GIL, so they hash while the caller checks the checkpoints, and the caller
    takes shares too when it asks for the result); processes are forked when the result is
    asked for (a fork must not meet other threads)."""

    collect: Callable[[], list[_Share] | None]
    threads: tuple[threading.Thread, ...] = ()
    #: The caller's part: hash shares no thread has taken yet.
    join_in: Callable[[], None] | None = None
    #: Set when no more shares are to be taken.
    cancel: threading.Event | None = None

    def wait(self) -> None:
        """Hand out no more shares and wait for the threads (also when the caller fails
        before asking for the result)."""
        if self.cancel is not None:
            self.cancel.set()
        for t in self.threads:
            t.join()

    def result(self) -> tuple[Sequence[bytes], dict[int, bytes]] | None:
        """Leaf hashes and roots of aligned blocks, when every head and link held; None
        when anything did not hold or a worker failed (the one-pass checks then decide)."""
        if self.join_in is not None:
            self.join_in()
        self.wait()
        reports = self.collect()
        if reports is None or not reports:
            return None
        expected = reports[0].seq
        for r in reports:
            # Each share's heads were checked from the number its first line claims: it must
            # be the count of the lines before it.
            if not r.ok or r.seq != expected:
                return None
            expected += r.entries
        blocks: dict[int, bytes] = {}
        for r in reports:
            for k in range(len(r.roots) // HASH_SIZE):
                blocks[r.first_block + k] = r.roots[k * HASH_SIZE : (k + 1) * HASH_SIZE]
        blob = b"".join(r.leaves for r in reports)
        if _native is not None:
            return _Hashes(blob), blocks
        return [blob[i : i + HASH_SIZE] for i in range(0, len(blob), HASH_SIZE)], blocks


def _parallel_entries(
    data: bytes, at: int, end: int, prefix: bytes, start: int, prev_hex: bytes, workers: int
) -> _EntryWorkers:
    """Leaf hashes of the entry lines in ``data[at:end]`` and roots of aligned blocks of
    them, computed by ``workers`` threads (native hasher) or forked processes (each reads its
    share of ``data`` in place); see :meth:`_EntryWorkers.result`."""
    if workers < 2 or end <= at:
        return _EntryWorkers(lambda: None)
    bounds = _split(data, at, end, workers * (_SHARES_PER_THREAD if _native else 1))
    if _native is not None:
        return _threaded_shares(data, at, bounds, prefix, start, prev_hex, workers - 1)
    return _EntryWorkers(lambda: _forked_shares(data, at, bounds, prefix, start, prev_hex))


#: With the native hasher the entries are cut into this many shares per worker, taken in
#: turn by the threads and, once it has checked the checkpoints, by the caller: the work
#: balances itself, and no more threads than cores are running.
_SHARES_PER_THREAD = 4


def _split(data: bytes, at: int, end: int, parts: int) -> list[tuple[int, int]]:
    """``data[at:end]`` cut at line ends into about ``parts`` ranges of similar size."""
    cuts = [at]
    for k in range(1, parts):
        j = data.find(b"\n", at + (end - at) * k // parts, end)
        if j < 0:
            break
        if j + 1 > cuts[-1]:
            cuts.append(j + 1)
    return [(lo, hi - 1) for lo, hi in itertools.pairwise(cuts)] + [(cuts[-1], end)]


def _threaded_shares(
    data: bytes, at: int, bounds: list[tuple[int, int]], prefix: bytes, start: int,
    prev_hex: bytes, threads: int,
) -> _EntryWorkers:
    """``threads`` threads, started now, and then the caller take the shares in turn: the
    native pass releases the GIL while hashing, so they run on all cores."""
    reports: list[_Share | None] = [None] * len(bounds)
    taken = itertools.count()  # next() on it is atomic under the GIL: each share goes once
    cancel = threading.Event()

    def take_shares() -> None:
        while not cancel.is_set() and (i := next(taken)) < len(bounds):
            reports[i] = _share(data, at, *bounds[i], prefix, start, prev_hex)

    def collect() -> list[_Share] | None:
        # A share whose worker raised has no report: the one-pass checks then decide.
        done = [r for r in reports if r is not None]
        return done if len(done) == len(reports) else None

    started: list[threading.Thread] = []
    try:
        for _ in range(threads):
            t = threading.Thread(target=take_shares, daemon=True)
            t.start()
            started.append(t)
    except RuntimeError:
        pass  # no more threads to be had (a process limit): the caller takes the rest
    return _EntryWorkers(collect, tuple(started), take_shares, cancel)


def _forked_shares(
    data: bytes, at: int, bounds: list[tuple[int, int]], prefix: bytes, start: int,
    prev_hex: bytes,
) -> list[_Share] | None:
    """Each share but the first hashed by a forked process (reporting through a pipe)."""
    children: list[tuple[int, int]] = []
    raw: list[bytes] = []
    first: _Share | None = None
    failed = False
    try:
        for lo, hi in bounds[1:]:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child, which reports through w
                code = 1
                try:
                    os.close(r)
                    own = _share(data, at, lo, hi, prefix, start, prev_hex)
                    view = memoryview(_HEAD.pack(own.seq, own.entries, own.ok, own.first_block,
                                                 len(own.roots) // HASH_SIZE)
                                      + own.leaves + own.roots)
                    while view:
                        view = view[os.write(w, view):]
                    code = 0
                finally:
                    os._exit(code)
            os.close(w)
            children.append((pid, r))
        first = _share(data, at, *bounds[0], prefix, start, prev_hex)
        for _pid, r in children:
            with os.fdopen(r, "rb", closefd=False) as pipe:
                raw.append(pipe.read())
    finally:
        for pid, r in children:
            try:
                os.close(r)
            except OSError:
                pass
            if os.waitpid(pid, 0)[1] != 0:
                failed = True
    if failed or first is None:
        return None
    reports = [first]
    for report in raw:
        if len(report) < _HEAD.size:
            return None
        seq, n, ok, first_block, m = _HEAD.unpack_from(report)
        body = report[_HEAD.size :]
        if len(body) != (n + m) * HASH_SIZE:
            return None
        cut = n * HASH_SIZE
        reports.append(_Share(seq, n, bool(ok), first_block, body[:cut], body[cut:]))
    return reports


def _check_consistency(a: Checkpoint, b: Checkpoint, proof: list[bytes] | None) -> None:
    if proof is None:
        raise AuditConsistencyError(
            f"no consistency proof between the checkpoints of size {a.size} and {b.size}"
        )
    if not verify_consistency(a.size, b.size, a.root_hash, b.root_hash, proof):
        raise AuditConsistencyError(
            f"the checkpoint of size {b.size} does not extend the checkpoint of size {a.size}"
        )


def _walk_entries(
    entries_of: Callable[[], list[bytes]],
    leaves: Sequence[bytes],
    blocks: dict[int, bytes],
    prefix: bytes,
    start: int,
    prev_hex: bytes,
    frontier: Frontier,
    targets: list[int],
    by_size: dict[int, Checkpoint],
) -> None:
    """Roots at each checkpoint size the entries reach, from the leaves of ``entries``.

    Only when a root does not match are the entries of that span walked one by one to name
    the first bad one.
    """
    # c. Roots at each checkpoint size the entries reach.
    pos = 0
    last_checked = start
    for t in targets:
        if t <= start:
            continue
        if t - start > len(leaves):
            break  # the file ends early; named by the caller
        _grow(frontier, leaves, pos, t - start, blocks)
        pos = t - start
        if frontier.root() != by_size[t].root_hash:
            # d. Find the first entry of the span (and its successor, which records its hash)
            #    whose sequence number or chain link is wrong.
            entries = entries_of()
            lo = last_checked - start
            hi = min(len(leaves), t - start + 1)
            prev = prev_hex if lo == 0 else leaves[lo - 1].hex().encode()
            for i in range(lo, hi):
                seq = start + i
                if not entries[i].startswith(_head(prefix, seq, prev)):
                    raise _diagnose(entries, i, seq, prefix, prev)
                prev = leaves[i].hex().encode()
            raise AuditRootMismatchError(
                f"entries {last_checked}..{t - 1} do not hash to the signed root of size {t}; "
                f"the hash chain is intact, so entry {t - 1} was altered or the chain was "
                "rewritten",
                seq=t - 1,
            )
        last_checked = t
    _grow(frontier, leaves, pos, len(leaves), blocks)
    # Entries past the last reached checkpoint are unsigned: the link checks name a broken
    # one, the caller refuses them as uncovered otherwise.


def _grow(
    frontier: Frontier, leaves: Sequence[bytes], lo: int, hi: int, blocks: dict[int, bytes]
) -> None:
    """Append ``leaves[lo:hi]`` to the tree: subtrees the workers reduced come from
    ``blocks``, the rest from the native reduction when the leaves came from it."""
    if isinstance(leaves, _Hashes):
        span = leaves.span(lo, hi)
        frontier.extend(span, blocks, _BLOCK_HEIGHT, root_of=span.root)
    else:
        frontier.extend(leaves[lo:hi], blocks, _BLOCK_HEIGHT)


def _runs(start: int, n: int) -> Iterator[tuple[int, int, int]]:
    """``(i, end, width)``: the runs of entries whose sequence numbers have ``width`` digits."""
    i = 0
    while i < n:
        width = len(str(start + i))
        end = min(n, 10**width - start)
        yield i, end, width
        i = end


def _check_heads(entries: list[bytes], prefix: bytes, start: int, prev_hex: bytes) -> None:
    """Every line starts ``{"v":1,"log":<log>,"seq":<next number>,"prev":"``.

    The expected heads of a run are formatted in one ``%`` operation and compared with
    ``bytes.startswith`` mapped over the run at C level: no per-entry Python statement.
    """
    template = prefix.replace(b"%", b"%%") + b'%d,"prev":"\n'
    for i, end, _ in _runs(start, len(entries)):
        run = entries[i:end]
        heads = (template * len(run) % tuple(range(start + i, start + end))).split(b"\n")
        if not all(map(bytes.startswith, run, heads)):
            k = next(k for k in range(i, end) if not entries[k].startswith(heads[k - i]))
            raise _diagnose(entries, k, start + k, prefix, _prev_hex(entries, k, prev_hex))


def _check_links(
    entries: list[bytes], leaves: Sequence[bytes], prefix: bytes, start: int, prev_hex: bytes
) -> None:
    """Every entry's ``prev`` is the leaf hash of its predecessor (after :func:`_check_heads`,
    so the field sits at a fixed offset within each run): one C-level pass per run."""
    hexes = [prev_hex]
    hexes.extend(map(binascii.hexlify, leaves[:-1]))
    base = len(prefix)
    for i, end, width in _runs(start, len(entries)):
        if not all(map(bytes.startswith, entries[i:end], hexes[i:end],
                       itertools.repeat(base + width + 9))):
            for k in range(i, end):
                if not entries[k].startswith(_head(prefix, start + k, hexes[k])):
                    raise _diagnose(entries, k, start + k, prefix, hexes[k])


def _head(prefix: bytes, seq: int, prev_hex: bytes) -> bytes:
    return prefix + str(seq).encode() + _PREV_FIELD + prev_hex


def _prev_hex(entries: list[bytes], i: int, first: bytes) -> bytes:
    return first if i == 0 else hashlib.sha256(b"\x00" + entries[i - 1]).hexdigest().encode()


def _diagnose(
    entries: list[bytes], i: int, expected: int, prefix: bytes, prev_hex: bytes
) -> AuditVerificationError:
    """Why line ``i`` (which should be entry ``expected``) failed the prefix check."""
    line = entries[i]
    if not line.startswith(prefix):
        if line.startswith(b'{"'):
            return AuditEntryMalformedError(
                f"entry {expected} is not a canonical entry of this log", seq=expected
            )
        return AuditExportMalformedError(
            f"the line after entry {expected - 1} is not an entry", seq=expected
        )
    j = line.find(b",", len(prefix))
    seq_text = line[len(prefix) : j]
    if seq_text != str(expected).encode():
        return _order_error(seq_text, expected)
    if line[j : j + 9] != _PREV_FIELD:
        return AuditEntryMalformedError(f"entry {expected} has no prev field", seq=expected)
    return _chain_error(entries, i, expected, prefix)


def _order_error(seq_text: bytes, expected: int) -> AuditEntryOrderError:
    try:
        got = int(seq_text)
    except ValueError:
        return AuditEntryOrderError(
            f"entry {expected} has no readable sequence number", seq=expected
        )
    if got > expected:
        return AuditEntryOrderError(
            f"entry {expected} is missing or moved (sequence number {got} is in its place)",
            seq=expected,
        )
    # A number seen before: name the repeated entry (one of its two copies is not genuine).
    return AuditEntryOrderError(
        f"entry {got} appears again where entry {expected} belongs (inserted or reordered)",
        seq=got,
    )


def _prev_of(line: bytes, prefix: bytes) -> bytes:
    j = line.find(b",", len(prefix))
    return line[j + 9 : j + 73]


def _chain_error(entries: list[bytes], i: int, seq: int, prefix: bytes) -> AuditChainBrokenError:
    # Entry i does not record the hash of entry i-1.  If entry i's own hash is also not what
    # entry i+1 records, entry i is the odd one (altered or inserted); otherwise entry i-1 was
    # altered after entry i was written.
    if i == 0:
        return AuditChainBrokenError(
            f"entry {seq} does not follow the tree the export starts from", seq=seq
        )
    nxt = entries[i + 1] if i + 1 < len(entries) else None
    if nxt is not None and nxt.startswith(prefix):
        if _prev_of(nxt, prefix) != leaf_hash(entries[i]).hex().encode():
            return AuditChainBrokenError(
                f"entry {seq} was altered or inserted: its predecessor and successor do not "
                "link to it",
                seq=seq,
            )
    return AuditChainBrokenError(
        f"entry {seq - 1} was altered: its hash is not the one entry {seq} recorded",
        seq=seq - 1,
    )


@dataclass(frozen=True, slots=True)
class EntryProofReport:
    """A single entry proven to be in a signed checkpoint."""

    log_id: str
    seq: int
    tree_size: int
    entry: bytes


def verify_entry_proof(
    bundle: dict[str, Any], public_key: Ed25519PublicKey, *, key_name: str | None = None
) -> EntryProofReport:
    """Check a single-entry proof (``GET /v1/audit/proof``): entry, index, checkpoint, path."""
    try:
        entry = str(bundle["entry"]).encode("ascii")
        seq = _int(bundle["seq"], "seq")
        note = str(bundle["checkpoint"])
        path = _b64_hashes(bundle["proof"], "the inclusion proof")
        log_id = str(bundle["log_id"])
    except (KeyError, UnicodeEncodeError) as exc:
        raise AuditExportMalformedError("the proof bundle is incomplete") from exc
    if not entry.startswith(entry_prefix(log_id) + str(seq).encode() + b","):
        raise AuditEntryMalformedError(f"the entry is not entry {seq} of log {log_id}", seq=seq)
    cp = verify_signed_checkpoint(note, public_key, name=key_name)
    if not _origin_names_log(cp.origin, log_id):
        raise AuditCheckpointInvalidError("the checkpoint is for another log")
    if not verify_inclusion(seq, cp.size, leaf_hash(entry), path, cp.root_hash):
        raise AuditInclusionError(
            f"entry {seq} is not included in the checkpoint of size {cp.size}", seq=seq
        )
    return EntryProofReport(log_id=log_id, seq=seq, tree_size=cp.size, entry=entry)
