"""Reading what a CLI command printed when it ran in the test's own process."""

from __future__ import annotations

import json
from typing import Any


def cli_json(out: str) -> Any:
    """The JSON document a command printed to ``out``.

    Services running in the same process (a test's app, the command's own) log from
    background threads, such as the audit checkpoint sweep, at any moment: their lines may
    come before or after the document, never inside it (one write per line or document).
    """
    lines = out.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith(("{", "[")):
            doc, _ = json.JSONDecoder().raw_decode("".join(lines[i:]))
            return doc
    raise AssertionError(f"no JSON document in the command's output: {out[:500]!r}")
