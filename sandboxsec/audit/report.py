"""The auditor's report: one self-contained HTML file built from an export, offline.

:func:`build_report` verifies the export exactly as ``sandboxsec audit verify`` does, then
summarises the entries it verified: the verdict, the witness cosignatures, a timeline of events,
approvals by person (key) and decision, refused actions, key rotations and shreds, and every key
id with the label the auditor gave it.  Everything is inline (CSS, SVG, a few lines of script);
the page's Content-Security-Policy forbids any network fetch, and every value from the export is
HTML-escaped, so a hostile export can neither phone home nor inject markup.

Pure: bytes, keys and labels in, an :class:`AuditReport` (with the HTML text) out.  When the
export does not verify, the report says so first and summarises nothing from it.
"""

from __future__ import annotations

import base64
import html
import json
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sandboxsec.audit.cosignature import WitnessKey
from sandboxsec.audit.errors import AuditVerificationError
from sandboxsec.audit.verify import ExportReport, verify_export
from sandboxsec.audit.witness_policy import WitnessPolicy

__all__ = ["AuditReport", "build_report"]

#: Rows shown per table; the totals are always exact.
_MAX_ROWS = 500
_REFUSED_OUTCOMES = frozenset({"deny", "denied", "refused", "failure", "reject", "rejected"})
_KEY_EVENTS = ("keys:",)
_CATEGORIES = (
    ("approval", "#2b6cb0"),
    ("policy", "#2f855a"),
    ("grant", "#805ad5"),
    ("keys", "#c05621"),
    ("trajectory", "#718096"),
    ("session", "#319795"),
    ("attestation", "#b7791f"),
    ("refused", "#c53030"),
    ("other", "#a0aec0"),
)


@dataclass(frozen=True, slots=True)
class AuditReport:
    """The verdict and the HTML page."""

    valid: bool
    code: str | None
    message: str | None
    html: str


def build_report(
    data: bytes,
    public_key: Ed25519PublicKey,
    *,
    key_name: str | None = None,
    witnesses: Sequence[WitnessKey] = (),
    min_witnesses: int = 0,
    labels: Mapping[str, str] | None = None,
    now: int | None = None,
    policy: WitnessPolicy | None = None,
) -> AuditReport:
    """Verify ``data`` and render the report (see the module docstring)."""
    labels = dict(labels or {})
    generated = datetime.fromtimestamp(now, UTC) if now is not None else None
    try:
        result = verify_export(
            data, public_key, key_name=key_name, witnesses=witnesses,
            min_witnesses=min_witnesses, now=now, policy=policy,
        )
        if policy is not None:
            witnesses = [*witnesses, *policy.keys]
    except AuditVerificationError as exc:
        where = f" First bad entry: {exc.seq}." if exc.seq is not None else ""
        page = _page(
            title="Audit report: INVALID",
            verdict=_verdict(False, exc.reason, exc.message + where, None, min_witnesses),
            body="<p>The export did not verify, so nothing in it is summarised: none of it "
            "can be trusted.</p>",
            generated=generated,
        )
        return AuditReport(False, exc.reason, exc.message, page)
    entries = [json.loads(line) for line in data.split(b"\n") if line.startswith(b'{"v":')]
    body = "\n".join([
        _witness_section(result, witnesses, min_witnesses),
        _timeline(entries),
        _approvals(entries, labels),
        _refused(entries, labels),
        _key_events(entries, labels),
        _key_ids(entries, labels),
    ])
    page = _page(
        title="Audit report: VALID",
        verdict=_verdict(True, None, None, result, min_witnesses),
        body=body,
        generated=generated,
    )
    return AuditReport(True, None, None, page)


# ------------------------------------------------------------------------------- sections

def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _who(key_id: str | None, role: str | None, labels: Mapping[str, str]) -> str:
    if not key_id:
        return f"<span class=muted>{_e(role or 'operator')}</span>"
    label = labels.get(key_id)
    text = f"{_e(label)} <code>{_e(key_id)}</code>" if label else f"<code>{_e(key_id)}</code>"
    return text


def _verdict(
    valid: bool, code: str | None, message: str | None, r: ExportReport | None, k: int
) -> str:
    if not valid or r is None:
        return (
            f'<section id=verdict class="verdict bad"><h2>Verdict: <span id=verdict-text>'
            f"INVALID</span></h2><p><code id=verdict-code>{_e(code)}</code> {_e(message)}</p>"
            "</section>"
        )
    witnessed = (
        f"{len(r.cosignatures)} witness cosignature(s) on the newest checkpoint"
        f" (required: {k})"
    )
    rows = [
        ("Log", f"<code>{_e(r.log_id)}</code>"),
        ("Origin", f"<code>{_e(r.origin)}</code>"),
        ("Entries verified", f"{r.entries} (seq {r.first_seq} to {r.end_seq - 1})"),
        ("Signed checkpoints", str(r.checkpoints)),
        ("Consistency proofs checked", str(r.consistency_proofs)),
        ("Tree size", str(r.tree_size)),
        ("Root hash", f"<code>{_e(base64.b64encode(r.root_hash).decode())}</code>"),
        ("Witnesses", _e(witnessed)),
    ]
    table = "".join(f"<tr><th>{a}</th><td>{b}</td></tr>" for a, b in rows)
    return (
        '<section id=verdict class="verdict good"><h2>Verdict: <span id=verdict-text>VALID'
        "</span></h2><p>Every entry hashes into the signed checkpoints, every <code>prev</code> "
        "link and sequence number holds, and consecutive checkpoints are consistent."
        f"</p><table class=kv>{table}</table></section>"
    )


def _witness_section(r: ExportReport, witnesses: Sequence[WitnessKey], k: int) -> str:
    if not witnesses:
        return (
            "<section id=witnesses><h2>Witness cosignatures</h2><p class=warn>No witness keys "
            "were given: the report cannot say whether anyone independent saw this history. "
            "Pass <code>--witness</code>.</p></section>"
        )
    got = {c.witness: c for c in r.cosignatures}
    rows = []
    for w in witnesses:
        c = got.get(w.name)
        when = (
            datetime.fromtimestamp(c.timestamp, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
            if c else ""
        )
        status = "<span class=ok>cosigned</span>" if c else "<span class=bad>missing</span>"
        rows.append(f"<tr><td>{_e(w.name)}</td><td><code>{_e(w.key_id.hex())}</code></td>"
                    f"<td>{status}</td><td>{_e(r.tree_size if c else '')}</td>"
                    f"<td>{_e(when)}</td></tr>")
    history = "".join(
        f"<li>size {size}: {_e(', '.join(names) or 'no trusted cosignature')}</li>"
        for size, names in r.witnessed
    )
    return (
        f"<section id=witnesses><h2>Witness cosignatures</h2><p>Quorum: {len(got)} of "
        f"{len(witnesses)} trusted witnesses cosigned the newest checkpoint; {k} required."
        "</p><table><thead><tr><th>witness</th><th>key id</th><th>status</th><th>tree size"
        f"</th><th>time</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        f"<details><summary>Every checkpoint in the export</summary><ul>{history}</ul>"
        "</details></section>"
    )


def _category(e: Mapping[str, Any]) -> str:
    event = str(e.get("event", ""))
    if str(e.get("outcome", "")) in _REFUSED_OUTCOMES or event.endswith((":refuse", ":reject")):
        return "refused"
    source = event.split(":", 1)[0]
    return source if source in {c for c, _ in _CATEGORIES} else "other"


def _parse_time(text: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None


def _timeline(entries: list[dict[str, Any]]) -> str:
    """A stacked bar chart of events per time bucket, by category, as inline SVG."""
    times = [(t, _category(e)) for e in entries if (t := _parse_time(e.get("time")))]
    if not times:
        return "<section id=timeline><h2>Timeline</h2><p>No entries.</p></section>"
    lo, hi = min(t for t, _ in times), max(t for t, _ in times)
    span = max((hi - lo).total_seconds(), 1.0)
    buckets = 60
    counts: list[Counter[str]] = [Counter() for _ in range(buckets)]
    for t, cat in times:
        i = min(buckets - 1, int((t - lo).total_seconds() / span * buckets))
        counts[i][cat] += 1
    peak = max(sum(c.values()) for c in counts) or 1
    width, height, left, bottom = 900, 220, 40, 30
    bar = (width - left) / buckets
    parts = []
    for i, c in enumerate(counts):
        y = float(height - bottom)
        for cat, color in _CATEGORIES:
            n = c.get(cat, 0)
            if not n:
                continue
            h = n / peak * (height - bottom - 10)
            y -= h
            start = lo.timestamp() + span * i / buckets
            label = datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%d %H:%M:%S")
            parts.append(
                f'<rect x="{left + i * bar:.1f}" y="{y:.1f}" width="{max(bar - 1, 1):.1f}" '
                f'height="{h:.1f}" fill="{color}" class="bar cat-{cat}"><title>{_e(label)}: '
                f"{n} {cat}</title></rect>"
            )
    axis = (
        f'<line x1="{left}" y1="{height - bottom}" x2="{width}" y2="{height - bottom}" '
        'stroke="#4a5568"/>'
        f'<text x="{left}" y="{height - 8}" class=axis>{_e(lo.strftime("%Y-%m-%d %H:%M:%SZ"))}'
        f'</text><text x="{width}" y="{height - 8}" class=axis text-anchor="end">'
        f'{_e(hi.strftime("%Y-%m-%d %H:%M:%SZ"))}</text>'
        f'<text x="{left - 6}" y="16" class=axis text-anchor="end">{peak}</text>'
    )
    legend = "".join(
        f'<span class=legend><i style="background:{color}"></i>{cat}</span>'
        for cat, color in _CATEGORIES
        if any(c.get(cat) for c in counts)
    )
    totals = Counter(cat for _, cat in times)
    return (
        f"<section id=timeline><h2>Timeline of events</h2><p>{len(times)} entries from "
        f"{_e(lo.isoformat())} to {_e(hi.isoformat())}; "
        + ", ".join(f"{n} {cat}" for cat, n in totals.most_common())
        + f'.</p><svg id=timeline-chart role="img" aria-label="events over time" '
        f'viewBox="0 0 {width} {height}" width="100%">{axis}{"".join(parts)}</svg>'
        f"<div>{legend}</div></section>"
    )


def _approvals(entries: list[dict[str, Any]], labels: Mapping[str, str]) -> str:
    decided = [e for e in entries if str(e.get("event", "")).startswith("approval:request:")
               and e.get("event") != "approval:request:create"]
    table: dict[tuple[str | None, str | None], Counter[str]] = defaultdict(Counter)
    for e in decided:
        actor = e.get("actor") or {}
        person = (e.get("body") or {}).get("person_id") or actor.get("key_id")
        table[(person, actor.get("role"))][str(e.get("outcome"))] += 1
    outcomes = sorted({o for c in table.values() for o in c})
    head = "".join(f"<th>{_e(o)}</th>" for o in outcomes)
    rows = "".join(
        f"<tr><td>{_who(p, role, labels)}</td>"
        + "".join(f"<td class=num>{c.get(o, 0)}</td>" for o in outcomes)
        + "</tr>"
        for (p, role), c in sorted(table.items(), key=lambda kv: -sum(kv[1].values()))
    )
    requested = sum(1 for e in entries if e.get("event") == "approval:request:create")
    return (
        f"<section id=approvals><h2>Approvals by person and decision</h2><p>{requested} "
        f"requests, {len(decided)} decisions.</p>"
        + (f"<table><thead><tr><th>person (key)</th>{head}</tr></thead><tbody>{rows}</tbody>"
           "</table>" if decided else "<p>No approval decisions.</p>")
        + "</section>"
    )


def _rows(entries: list[dict[str, Any]], labels: Mapping[str, str]) -> str:
    out = []
    for e in entries[:_MAX_ROWS]:
        actor = e.get("actor") or {}
        ids = ", ".join(f"{k}={v}" for k, v in sorted((e.get("object_ids") or {}).items()))
        out.append(
            f"<tr><td class=num>{_e(e.get('seq'))}</td><td>{_e(e.get('time'))}</td>"
            f"<td><code>{_e(e.get('event'))}</code></td><td>{_e(e.get('outcome'))}</td>"
            f"<td>{_who(actor.get('key_id'), actor.get('role'), labels)}</td>"
            f"<td><code>{_e(e.get('reason'))}</code></td><td class=ids>{_e(ids)}</td></tr>"
        )
    more = (f"<p class=muted>Showing {_MAX_ROWS} of {len(entries)}.</p>"
            if len(entries) > _MAX_ROWS else "")
    return (
        "<table><thead><tr><th>seq</th><th>time</th><th>event</th><th>outcome</th><th>by</th>"
        f"<th>reason</th><th>objects</th></tr></thead><tbody>{''.join(out)}</tbody></table>"
        + more
    )


def _refused(entries: list[dict[str, Any]], labels: Mapping[str, str]) -> str:
    refused = [e for e in entries if _category(e) == "refused"]
    reasons = Counter(str(e.get("reason") or "no reason given") for e in refused)
    summary = ", ".join(f"{_e(r)}: {n}" for r, n in reasons.most_common(10))
    return (
        f"<section id=refused><h2>Refused actions</h2><p>{len(refused)} refused or denied"
        + (f" ({summary})" if summary else "") + ".</p>"
        + (_rows(refused, labels) if refused else "") + "</section>"
    )


def _key_events(entries: list[dict[str, Any]], labels: Mapping[str, str]) -> str:
    keys = [e for e in entries if str(e.get("event", "")).startswith(_KEY_EVENTS)]
    kinds = Counter(str(e.get("event")) for e in keys)
    summary = ", ".join(f"{_e(k)}: {n}" for k, n in sorted(kinds.items()))
    return (
        f"<section id=keys><h2>Key rotations and shreds</h2><p>{len(keys)} key events"
        + (f" ({summary})" if summary else "") + ".</p>"
        + (_rows(keys, labels) if keys else "") + "</section>"
    )


def _key_ids(entries: list[dict[str, Any]], labels: Mapping[str, str]) -> str:
    seen: dict[str, tuple[Counter[str], int]] = {}
    for e in entries:
        actor = e.get("actor") or {}
        kid = actor.get("key_id")
        if not kid:
            continue
        roles, n = seen.get(kid, (Counter(), 0))
        roles[str(actor.get("role"))] += 1
        seen[kid] = (roles, n + 1)
    rows = "".join(
        f"<tr><td><code>{_e(k)}</code></td><td>{_e(labels.get(k, ''))}</td>"
        f"<td>{_e(', '.join(sorted(r)))}</td><td class=num>{n}</td></tr>"
        for k, (r, n) in sorted(seen.items(), key=lambda kv: -kv[1][1])
    )
    unlabelled = sum(1 for k in seen if k not in labels)
    return (
        f"<section id=key-ids><h2>Key ids and labels</h2><p>{len(seen)} keys acted; "
        f"{unlabelled} without a label (give labels with <code>--labels</code>).</p>"
        "<table><thead><tr><th>key id</th><th>label</th><th>role</th><th>entries</th></tr>"
        f"</thead><tbody>{rows}</tbody></table></section>"
    )


# ---------------------------------------------------------------------------------- page

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1a202c;
background:#f7fafc}
main{max-width:1000px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:0 0 8px}
section{background:#fff;border:1px solid #e2e8f0;border-radius:6px;padding:16px;margin:16px 0}
.verdict.good{border-left:8px solid #2f855a}.verdict.bad{border-left:8px solid #c53030}
.verdict.good h2{color:#22543d}.verdict.bad h2{color:#9b2c2c}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #edf2f7;vertical-align:top}
thead th{background:#edf2f7}.kv th{width:230px;background:none}
td.num{text-align:right;font-variant-numeric:tabular-nums}
code{font:12px ui-monospace,monospace;word-break:break-all}
.ids{font-size:12px;color:#4a5568;word-break:break-all}
.muted{color:#718096}.warn{color:#975a16}.ok{color:#276749;font-weight:600}
.bad{color:#c53030;font-weight:600}
.legend{display:inline-block;margin-right:14px;font-size:12px}
.legend i{display:inline-block;width:10px;height:10px;margin-right:4px;border-radius:2px}
svg .axis{font-size:11px;fill:#4a5568}
input#filter{width:100%;padding:6px;margin:8px 0;border:1px solid #cbd5e0;border-radius:4px}
"""

# Filters table rows by text; the page works without it.
_JS = """
document.getElementById('filter').addEventListener('input', function (ev) {
  var q = ev.target.value.toLowerCase();
  document.querySelectorAll('section tbody tr').forEach(function (tr) {
    tr.style.display = tr.textContent.toLowerCase().indexOf(q) < 0 ? 'none' : '';
  });
});
"""


def _page(*, title: str, verdict: str, body: str, generated: datetime | None) -> str:
    when = generated.strftime("%Y-%m-%d %H:%M:%SZ") if generated else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:\">"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
        f"<h1>sandboxsec audit report</h1><p class=muted>Generated {_e(when)} offline from "
        "an audit export; verified with the audit public key and witness keys the auditor "
        "holds.</p>"
        f"{verdict}<input id=filter placeholder=\"Filter the tables\" aria-label=filter>"
        f"{body}</main><script>{_JS}</script></body></html>\n"
    )
