"""The trust directory's stamp (compared on every verification) changes with every change an
operator can make to a trust file: add, edit in place, replace, remove, and a directory that
appears or disappears."""

from __future__ import annotations

import os
from pathlib import Path

from sandboxsec.attestation.service import _trust_stamp


def _tree(base: Path) -> None:
    for sub in ("trust-roots/publishers", "trust-roots/tpm-manufacturers", "revocations"):
        (base / sub).mkdir(parents=True)
    (base / "trust-roots/publishers/a.pem").write_text("A")
    (base / "revocations/revoked.txt").write_text("cert-sha256:00\n")


def test_the_stamp_is_stable_while_nothing_changes(tmp_path: Path) -> None:
    _tree(tmp_path)
    assert _trust_stamp(tmp_path) == _trust_stamp(tmp_path)


def test_every_kind_of_change_moves_the_stamp(tmp_path: Path) -> None:
    _tree(tmp_path)
    revoked = tmp_path / "revocations/revoked.txt"
    seen = [_trust_stamp(tmp_path)]

    def changed() -> None:
        now = _trust_stamp(tmp_path)
        assert now != seen[-1]
        seen.append(now)

    # An edit in place of the same size: only the modification time tells.
    st = revoked.stat()
    revoked.write_text("cert-sha256:11\n")
    os.utime(revoked, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    changed()
    # A file added, then replaced by rename (a new inode), then removed.
    (tmp_path / "revocations/more.txt").write_text("serial:01\n")
    changed()
    spare = tmp_path / "revocations/.new"
    spare.write_text("serial:02\n")
    spare.replace(tmp_path / "revocations/more.txt")
    changed()
    (tmp_path / "revocations/more.txt").unlink()
    changed()
    # A directory that appears (intermediates) and one that disappears.
    (tmp_path / "trust-roots/tpm-intermediates").mkdir()
    changed()
    (tmp_path / "trust-roots/publishers/a.pem").unlink()
    (tmp_path / "trust-roots/publishers").rmdir()
    changed()
