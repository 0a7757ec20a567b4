"""Which witnesses must have cosigned: the C2SP tlog-policy file format (c2sp.org/tlog-policy).

::

    log <vkey> [<url>]
    witness <name> <vkey> [<url>]
    group <name> all|any|<k> <member>...
    quorum <name>|none

Names are local to the file; a group or the quorum may only name what an earlier line
defined; each name is a member of a given group at most once; exactly one quorum line.  A
witness or group "witnessed" a checkpoint when it cosigned it (a witness) or when at least k of
its members did (a group).  Pure: text in, a :class:`WitnessPolicy` out, or ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sandboxsec.audit.cosignature import WitnessKey, parse_witness_key
from sandboxsec.audit.keys import load_public_key

__all__ = ["WitnessPolicy", "parse_witness_policy"]

_MAX_ITEMS = 256


@dataclass(frozen=True, slots=True)
class WitnessPolicy:
    """A parsed policy: the logs, the witnesses by policy name, the groups and the quorum."""

    logs: tuple[tuple[str, Ed25519PublicKey], ...]
    witnesses: dict[str, WitnessKey]
    groups: dict[str, tuple[int, tuple[str, ...]]]
    quorum: str | None

    @property
    def keys(self) -> list[WitnessKey]:
        """The witness keys whose cosignatures count."""
        return list(self.witnesses.values())

    def satisfied(self, cosigned_by: Collection[str]) -> bool:
        """Whether cosignatures by the witnesses named ``cosigned_by`` (their key names, as
        in :class:`~sandboxsec.audit.cosignature.Cosignature`) meet the quorum."""
        if self.quorum is None:
            return True
        return self._witnessed(self.quorum, set(cosigned_by))

    def _witnessed(self, name: str, cosigned_by: set[str]) -> bool:
        key = self.witnesses.get(name)
        if key is not None:
            return key.name in cosigned_by
        k, members = self.groups[name]
        return sum(self._witnessed(m, cosigned_by) for m in members) >= k


def parse_witness_policy(text: str) -> WitnessPolicy:
    """Parse a tlog-policy file (see the module docstring); ``ValueError`` says which line."""
    logs: list[tuple[str, Ed25519PublicKey]] = []
    witnesses: dict[str, WitnessKey] = {}
    groups: dict[str, tuple[int, tuple[str, ...]]] = {}
    quorum: str | None = None
    quorum_seen = False
    raw_keys: set[bytes] = set()
    for n, line in enumerate(text.split("\n"), start=1):
        if any(ord(c) < 0x20 and c != "\t" for c in line):
            raise ValueError(f"line {n}: control characters")
        words = line.replace("\t", " ").split()
        if not words or words[0].startswith("#"):
            continue
        if len(logs) + len(witnesses) + len(groups) > _MAX_ITEMS:
            raise ValueError("the policy defines too many logs, witnesses and groups")
        kind, args = words[0], words[1:]
        defined = witnesses.keys() | groups.keys()
        try:
            if kind == "log" and len(args) in (1, 2):
                key = load_public_key(args[0].encode())
                name = args[0].split("+", 1)[0]
                logs.append((name, key))
            elif kind == "witness" and len(args) in (2, 3):
                name = args[0]
                if name in defined or name == "none":
                    raise ValueError(f"{name!r} is defined twice")
                w = parse_witness_key(args[1])
                raw = w.vkey().split("+", 2)[2].encode()
                if raw in raw_keys:
                    raise ValueError("the same witness key is listed twice")
                raw_keys.add(raw)
                witnesses[name] = w
            elif kind == "group" and len(args) >= 3:
                name, threshold, members = args[0], args[1], args[2:]
                if name in defined or name == "none":
                    raise ValueError(f"{name!r} is defined twice")
                if len(set(members)) != len(members):
                    raise ValueError("a member is listed twice")
                unknown = [m for m in members if m not in defined]
                if unknown:
                    raise ValueError(f"{unknown[0]!r} is not defined on an earlier line")
                if threshold == "all":
                    k = len(members)
                elif threshold == "any":
                    k = 1
                elif threshold.isdigit() and not threshold.startswith("0"):
                    k = int(threshold)
                else:
                    raise ValueError("the threshold is all, any or a decimal k")
                if not 1 <= k <= len(members):
                    raise ValueError("the threshold is outside 1..number of members")
                groups[name] = (k, tuple(members))
            elif kind == "quorum" and len(args) == 1:
                if quorum_seen:
                    raise ValueError("more than one quorum line")
                if args[0] != "none" and args[0] not in defined:
                    raise ValueError(f"{args[0]!r} is not defined on an earlier line")
                quorum_seen = True
                quorum = None if args[0] == "none" else args[0]
            else:
                raise ValueError(f"not a policy line: {kind!r} with {len(args)} arguments")
        except ValueError as exc:
            raise ValueError(f"line {n}: {exc}") from exc
    if not quorum_seen:
        raise ValueError("the policy has no quorum line")
    return WitnessPolicy(tuple(logs), witnesses, groups, quorum)
