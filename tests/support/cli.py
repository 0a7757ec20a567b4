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
    docs = cli_jsons(out)
    if not docs:
        raise AssertionError(f"no JSON document in the command's output: {out[:500]!r}")
    return docs[0]


def cli_jsons(out: str) -> list[Any]:
    """Every JSON document printed to ``out`` by commands run one after another, in order
    (log lines of background threads between them are skipped)."""
    docs: list[Any] = []
    lines = out.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        if lines[i].startswith(("{", "[")):
            rest = "".join(lines[i:])
            doc, end = json.JSONDecoder().raw_decode(rest)
            docs.append(doc)
            i += rest[:end].count("\n") + 1
        else:
            i += 1
    return docs
