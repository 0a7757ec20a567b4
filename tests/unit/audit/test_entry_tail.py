"""An entry's tail is canonical JSON, part by part: checked against ``json.dumps`` (sorted
keys, no whitespace, ASCII escapes) on arbitrary records, so the hand-built parts never drift
from the documented format."""

from __future__ import annotations

import hmac
import json
from enum import Enum
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sandboxsec.audit.entry import encode_tail
from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.record import AuditRecord

KEY = b"k" * 32


class Colour(Enum):
    RED = "red"


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def _text(v: Any) -> str:
    return str(v.value) if isinstance(v, Enum) else str(v)


_TEXT = st.text(max_size=12)
_SCALAR = st.one_of(_TEXT, st.integers(), st.none(), st.just(Colour.RED), st.booleans())


@settings(max_examples=300, deadline=None)
@given(
    tenant=st.one_of(st.none(), _TEXT), key_id=st.one_of(st.none(), _TEXT),
    role=st.one_of(st.none(), _TEXT), outcome=st.one_of(st.none(), _TEXT, st.just(Colour.RED)),
    reason=st.one_of(st.none(), _TEXT),
    object_ids=st.dictionaries(st.one_of(_TEXT, st.integers()), _SCALAR, max_size=4),
    body=st.dictionaries(_TEXT, st.one_of(_SCALAR.filter(lambda v: not isinstance(v, Enum)),
                                          st.lists(st.integers(), max_size=3)), max_size=4),
    sensitive=st.dictionaries(_TEXT, st.one_of(_TEXT, st.integers()), max_size=3),
)
def test_tail_parts_are_canonical_json(
    tenant: str | None, key_id: str | None, role: str | None, outcome: Any, reason: str | None,
    object_ids: dict[Any, Any], body: dict[str, Any], sensitive: dict[str, Any],
) -> None:
    record = AuditRecord(event=AuditEvent.POLICY_DECISION, tenant_id=tenant,
                         actor_key_id=key_id, actor_role=role, outcome=outcome, reason=reason,
                         object_ids=object_ids, body=body, sensitive=sensitive)
    tail = encode_tail(record, hmac_key=KEY)

    def q(v: Any) -> str:
        return "null" if v is None else _dumps(_text(v))

    macs = {}
    for name, value in sensitive.items():
        data = value.encode() if isinstance(value, str) else _dumps(value).encode()
        macs[name] = "hmac-sha256:" + hmac.digest(KEY, data, "sha256").hex()
    ids = {str(k): str(None) if v is None else _text(v) for k, v in object_ids.items()}
    expected = (
        f'"tenant":{q(tenant)},"actor":{{"key_id":{q(key_id)},"role":{q(role)}}},'
        f'"event":{q(AuditEvent.POLICY_DECISION)},"outcome":{q(outcome)},"reason":{q(reason)},'
        f'"object_ids":{_dumps(ids)},"body":{_dumps(body)},"hmac":{_dumps(macs)}}}'
    )
    assert tail == expected
    assert tail.isascii()
    json.loads("{" + tail)
