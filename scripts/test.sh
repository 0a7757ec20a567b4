#!/usr/bin/env bash
# The whole suite: lint, type check, then pytest on SQLite and a throwaway PostgreSQL 15
# cluster (started by the test session in a temp dir and removed after).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
echo "== ruff"; $BIN/ruff check sandboxsec tests bench clients
echo "== mypy --strict sandboxsec"; $BIN/mypy sandboxsec clients/python/src
echo "== import contracts"; $BIN/lint-imports --no-logo
echo "== pytest"
# The run's scratch files (per-test databases, key stores and audit state, the throwaway
# PostgreSQL cluster, vTPM state) go to memory when there is room: the code still fsyncs
# everything it must, but a test no longer waits ~3 ms per fsync on the disk, which is what
# a test of logic (not of the disk) would otherwise spend much of its time on.  An explicit
# TMPDIR is kept; without 4 GiB free in /dev/shm nothing changes.
if [ -z "${TMPDIR:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ] \
    && [ "$(df -Pk /dev/shm | awk 'NR==2 {print $4}')" -gt 4194304 ]; then
  TMPDIR="$(mktemp -d /dev/shm/sandboxsec-test.XXXXXX)"
  chmod 1777 "$TMPDIR"  # like /tmp: the PostgreSQL cluster runs as its own user under root
  export TMPDIR
  trap 'rm -rf "$TMPDIR"' EXIT
fi
set +e
# One test process more than the two cores CI has: many tests wait on a server, swtpm,
# PostgreSQL or a browser, and the third process fills those waits.
$BIN/pytest -n "${SANDBOXSEC_TEST_WORKERS:-3}" --dist worksteal "$@"
rc=$?
set -e
# pytest exits 5 when a marker selection collected nothing; that is not a failure of ours.
if [ "$rc" = 5 ]; then exit 0; fi
exit "$rc"
