"""C2SP tlog-policy files: parsing (with the spec's example shape) and quorum evaluation,
and an export verified against a policy."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sandboxsec.audit.checkpoint import Checkpoint, verifier_key
from sandboxsec.audit.cosignature import WitnessKey, cosign
from sandboxsec.audit.errors import AuditWitnessQuorumError
from sandboxsec.audit.merkle import MerkleTree
from sandboxsec.audit.verify import verify_export
from sandboxsec.audit.witness_policy import parse_witness_policy
from tests.unit.audit.synth import KEY_NAME, ORIGIN, SynthLog

KEYS = {n: Ed25519PrivateKey.generate() for n in ("X1", "X2", "X3", "Y1", "Y2", "Y3")}
WKEYS = {n: WitnessKey.from_private(f"{n.lower()}.example/w", k) for n, k in KEYS.items()}
LOG = SynthLog(20, every=10)


def _policy_text(quorum: str = "X-and-Y") -> str:
    # The shape of the example in c2sp.org/tlog-policy, with real keys.
    return "\n".join([
        "# a comment",
        f"log {verifier_key(KEY_NAME, LOG.key.public_key())}",
        "",
        *(f"witness {n} {WKEYS[n].vkey()}" for n in ("X1", "X2", "X3")),
        "group X-witnesses 2 X1 X2 X3",
        *(f"\twitness {n} {WKEYS[n].vkey()} https://{n.lower()}.example/" for n in
          ("Y1", "Y2", "Y3")),
        "group Y-witnesses any Y1 Y2 Y3",
        "group X-and-Y all X-witnesses Y-witnesses",
        f"quorum {quorum}",
        "",
    ])


def test_the_spec_example_quorum() -> None:
    p = parse_witness_policy(_policy_text())
    names = {n: WKEYS[n].name for n in WKEYS}
    assert p.satisfied({names["X1"], names["X3"], names["Y2"]})
    assert not p.satisfied({names["X1"], names["Y1"], names["Y2"], names["Y3"]})
    assert not p.satisfied({names["X1"], names["X2"], names["X3"]})
    assert not p.satisfied(set())
    assert parse_witness_policy(_policy_text("none")).satisfied(set())
    assert parse_witness_policy(_policy_text("Y1")).satisfied({names["Y1"]})


@pytest.mark.parametrize(
    "text",
    [
        "witness A {X1}\n",  # no quorum
        "witness A {X1}\nquorum A\nquorum A\n",  # two quorums
        "quorum A\nwitness A {X1}\n",  # quorum before its definition
        "witness A {X1}\ngroup G 2 A\nquorum G\n",  # k > n
        "witness A {X1}\ngroup G 0 A\nquorum G\n",  # k = 0
        "witness A {X1}\ngroup G any A A\nquorum G\n",  # member twice
        "witness A {X1}\nwitness B {X1}\nquorum A\n",  # same key twice
        "witness A {X1}\nwitness A {X2}\nquorum A\n",  # same name twice
        "witness none {X1}\nquorum none\n",
        "witness A not-a-key\nquorum A\n",
        "witness A {LOGKEY}\nquorum A\n",  # a log key (type 0x01) is no witness key
        "frobnicate A\nquorum none\n",
        "witness A {X1}\x0b\nquorum A\n",
    ],
)
def test_bad_policies_are_refused(text: str) -> None:
    text = text.replace("{X1}", WKEYS["X1"].vkey()).replace("{X2}", WKEYS["X2"].vkey())
    text = text.replace("{LOGKEY}", verifier_key(KEY_NAME, LOG.key.public_key()))
    with pytest.raises(ValueError):
        parse_witness_policy(text)


def _cosigned_export(signers: list[str]) -> bytes:
    tree = MerkleTree(LOG.leaves)
    cp = Checkpoint(ORIGIN, 20, tree.root(20))
    lines = "".join(cosign(cp, name=WKEYS[n].name, private_key=KEYS[n], timestamp=100)
                    for n in signers)
    note = LOG.notes[20]
    # The C2SP form: cosignatures appended to the note itself.
    return LOG.export(notes=[LOG.notes[10], note + lines])


def test_an_export_is_held_to_the_policy() -> None:
    policy = parse_witness_policy(_policy_text())
    pub = LOG.key.public_key()
    report = verify_export(_cosigned_export(["X1", "X2", "Y3"]), pub, policy=policy)
    assert {c.witness for c in report.cosignatures} == {WKEYS[n].name for n in ("X1", "X2", "Y3")}
    with pytest.raises(AuditWitnessQuorumError):
        verify_export(_cosigned_export(["X1", "Y3"]), pub, policy=policy)
