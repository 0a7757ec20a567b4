"""The `image sign` and `image verify` commands: exit 0 valid, 1 invalid, 2 usage error."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from sandboxsec.cli import main
from tests.support.cli import cli_json
from tests.support.pki import Publisher, make_publisher

PCR0 = hashlib.sha256(b"firmware").hexdigest()
PCR7 = hashlib.sha256(b"secure boot").hexdigest()
EVENT = hashlib.sha256(b"kernel").hexdigest()


@dataclass
class Files:
    tmp: Path
    pub: Publisher
    image: Path
    key: Path
    cert: Path
    chain: Path
    root: Path

    def sign(self, *extra: str, output: str = "image.dsse.json") -> tuple[int, Path]:
        out = self.tmp / output
        code = main(
            [
                "image",
                "sign",
                str(self.image),
                "--key",
                str(self.key),
                "--cert",
                str(self.cert),
                "--chain",
                str(self.chain),
                "--pcr",
                f"0={PCR0}",
                "--pcr",
                f"sha256:7={PCR7.upper()}",
                "--event-digest",
                f"4={EVENT}",
                "--version",
                "2.0.1",
                *extra,
                "-o",
                str(out),
            ]
        )
        return code, out

    def verify(self, manifest: Path, *extra: str, image: Path | None = None) -> int:
        return main(
            [
                "image",
                "verify",
                str(image or self.image),
                str(manifest),
                "--trust-root",
                str(self.root),
                *extra,
            ]
        )


def _files(tmp_path: Path, key_type: str = "p256") -> Files:
    # The command reads the real clock, so the signing certificate is valid around it.
    real_now = datetime.now(UTC)
    pub = make_publisher(  # type: ignore[arg-type]
        key_type, not_before=real_now - timedelta(days=1), not_after=real_now + timedelta(days=400)
    )
    image = tmp_path / "sandbox.qcow2"
    image.write_bytes(b"\x00" * 100_000 + b"kernel and rootfs")
    key = tmp_path / "publisher.key"
    key.write_bytes(pub.leaf.key_pem)
    cert = tmp_path / "publisher.pem"
    cert.write_bytes(pub.leaf.pem)
    chain = tmp_path / "chain.pem"
    chain.write_bytes(b"".join(i.pem for i in pub.intermediates) + pub.root.pem)
    root = tmp_path / "root.pem"
    root.write_bytes(pub.root.pem)
    return Files(tmp_path, pub, image, key, cert, chain, root)


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return _files(tmp_path)


@pytest.mark.parametrize("key_type", ["p256", "ed25519"])
def test_sign_then_verify(
    tmp_path: Path, key_type: str, capsys: pytest.CaptureFixture[str]
) -> None:
    f = _files(tmp_path, key_type)
    code, manifest = f.sign()
    assert code == 0, capsys.readouterr().err
    summary = cli_json(capsys.readouterr().out)
    assert summary["image_digest"] == "sha256:" + hashlib.sha256(f.image.read_bytes()).hexdigest()
    assert summary["image_name"] == "sandbox.qcow2"
    assert f.verify(manifest) == 0
    out = capsys.readouterr().out
    assert out.startswith("valid: sandbox.qcow2 sha256:") and "version 2.0.1" in out

    assert f.verify(manifest, "--json") == 0
    result = cli_json(capsys.readouterr().out)
    assert result["valid"] is True
    reference = result["manifest"]["reference"]
    assert reference["pcrs"] == {"sha256": {"0": PCR0, "7": PCR7}}
    assert reference["event_digests"] == {"4": [EVENT]}
    # The root is never carried in the manifest.
    doc = json.loads(manifest.read_bytes())
    assert len(doc["signatures"][0]["certificates"]) == 2


def test_tampered_image(files: Files, capsys: pytest.CaptureFixture[str]) -> None:
    _, manifest = files.sign()
    data = bytearray(files.image.read_bytes())
    data[50_000] ^= 0x01
    tampered = files.tmp / "tampered.qcow2"
    tampered.write_bytes(bytes(data))
    capsys.readouterr()
    assert files.verify(manifest, image=tampered) == 1
    assert "invalid: image_digest_mismatch" in capsys.readouterr().err


def test_tampered_manifest(files: Files, capsys: pytest.CaptureFixture[str]) -> None:
    _, manifest = files.sign()
    doc = json.loads(manifest.read_bytes())
    sig = bytearray(base64.b64decode(doc["signatures"][0]["sig"]))
    sig[10] ^= 0x01
    doc["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    manifest.write_text(json.dumps(doc))
    capsys.readouterr()
    assert files.verify(manifest, "--json") == 1
    captured = capsys.readouterr()
    assert cli_json(captured.out)["error"]["code"] == "image_signature_invalid"
    assert "invalid: image_signature_invalid" in captured.err


def test_untrusted_root(files: Files, capsys: pytest.CaptureFixture[str]) -> None:
    _, manifest = files.sign()
    other = files.tmp / "other.pem"
    other.write_bytes(make_publisher().root.pem)
    capsys.readouterr()
    assert (
        main(["image", "verify", str(files.image), str(manifest), "--trust-root", str(other)]) == 1
    )
    assert "invalid: cert_untrusted_issuer" in capsys.readouterr().err


def test_revocation_lists(files: Files, capsys: pytest.CaptureFixture[str]) -> None:
    _, manifest = files.sign()
    digest = "sha256:" + hashlib.sha256(files.image.read_bytes()).hexdigest()
    revoked = files.tmp / "revoked.txt"
    revoked.write_text(f"# revoked publisher key\ncert-serial:{files.pub.leaf.serial:#x}\n")
    assert files.verify(manifest, "--revoked", str(revoked)) == 1
    assert "invalid: cert_revoked" in capsys.readouterr().err
    revoked.write_text(f"image:{digest}  # CVE in the guest kernel\n")
    assert files.verify(manifest, "--revoked", str(revoked)) == 1
    assert "invalid: image_digest_revoked" in capsys.readouterr().err
    revoked.write_text("cert-serial:banana\n")
    assert files.verify(manifest, "--revoked", str(revoked)) == 2
    assert "error: trust_store_invalid" in capsys.readouterr().err


def test_crl_option(files: Files, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.support.pki import make_crl

    _, manifest = files.sign()
    real_now = datetime.now(UTC)
    crl = make_crl(
        files.pub.intermediates[0],
        [files.pub.leaf.serial],
        this_update=real_now - timedelta(hours=1),
        next_update=real_now + timedelta(days=7),
    )
    crl_path = files.tmp / "issuing.crl"
    crl_path.write_bytes(crl.public_bytes(serialization.Encoding.DER))
    assert files.verify(manifest, "--crl", str(crl_path)) == 1
    assert "invalid: cert_revoked" in capsys.readouterr().err


def test_expired_manifest_with_at(files: Files, capsys: pytest.CaptureFixture[str]) -> None:
    code, manifest = files.sign("--valid-days", "10")
    assert code == 0
    later = (datetime.now(UTC) + timedelta(days=11)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert files.verify(manifest, "--at", later) == 1
    assert "invalid: image_manifest_expired" in capsys.readouterr().err


def test_explicit_expiry_and_name(files: Files, capsys: pytest.CaptureFixture[str]) -> None:
    expires = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0)
    code, manifest = files.sign("--expires", expires.isoformat(), "--name", "registry/sandbox:2")
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    assert files.verify(manifest, "--json") == 0
    result = cli_json(capsys.readouterr().out)["manifest"]
    assert result["image_name"] == "registry/sandbox:2"
    assert result["expires_at"] == expires.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_trust_dir_layout(files: Files, capsys: pytest.CaptureFixture[str]) -> None:
    _, manifest = files.sign()
    trust = files.tmp / "trust"
    (trust / "trust-roots" / "publishers").mkdir(parents=True)
    (trust / "trust-roots" / "publishers" / "publisher-root.pem").write_bytes(files.pub.root.pem)
    assert (
        main(["image", "verify", str(files.image), str(manifest), "--trust-dir", str(trust)]) == 0
    )
    (trust / "revocations").mkdir()
    (trust / "revocations" / "revoked.txt").write_text(
        f"cert-sha256:{files.pub.leaf.fingerprint}\n"
    )
    assert (
        main(["image", "verify", str(files.image), str(manifest), "--trust-dir", str(trust)]) == 1
    )
    assert "invalid: cert_revoked" in capsys.readouterr().err
    empty = files.tmp / "empty"
    empty.mkdir()
    assert (
        main(["image", "verify", str(files.image), str(manifest), "--trust-dir", str(empty)]) == 1
    )
    assert "invalid: image_trust_store_empty" in capsys.readouterr().err


def test_encrypted_key_with_password_file(files: Files, capsys: pytest.CaptureFixture[str]) -> None:
    encrypted = files.pub.leaf.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"correct horse"),
    )
    files.key.write_bytes(encrypted)
    assert files.sign()[0] == 2
    err = capsys.readouterr().err
    assert "error: invalid_input" in err and "correct horse" not in err
    password = files.tmp / "pass.txt"
    password.write_text("wrong\n")
    assert files.sign("--key-password-file", str(password))[0] == 2
    assert "correct horse" not in capsys.readouterr().err
    password.write_text("correct horse\n")
    code, manifest = files.sign("--key-password-file", str(password))
    assert code == 0
    assert files.verify(manifest) == 0


def test_digest_command(files: Files, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["image", "digest", str(files.image)]) == 0
    assert (
        capsys.readouterr().out.strip()
        == "sha256:" + hashlib.sha256(files.image.read_bytes()).hexdigest()
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--pcr", "3=abc"], "--pcr"),
        (["--pcr", "99=" + "00" * 32], "PCR index"),
        (["--pcr", "3=" + "00" * 20], "must be 32 bytes"),
        (["--pcr", "sha3:3=" + "00" * 32], "unknown PCR bank"),
        (["--pcr", "3=" + "00" * 32, "--pcr", "3=" + "11" * 32], "given twice"),
        (["--event-digest", "4=abcd"], "--event-digest"),
        (["--expires", "2020-01-01T00:00:00Z"], "in the past"),
        (["--expires", "2030-01-01"], "time zone"),
        (["--expires", "soon"], "RFC 3339"),
        (["--valid-days", "0"], "positive"),
    ],
)
def test_sign_usage_errors(
    files: Files, capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    capsys.readouterr()
    assert files.sign(*args)[0] == 2
    assert fragment in capsys.readouterr().err


def test_sign_refuses_bad_inputs(files: Files, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.support.pki import make_publisher as mk

    # A key that does not match the certificate.
    files.key.write_bytes(mk().leaf.key_pem)
    assert files.sign()[0] == 2
    assert "image_signing_key_mismatch" in capsys.readouterr().err
    # An RSA key.
    files.key.write_bytes(mk("rsa2048").leaf.key_pem)
    assert files.sign()[0] == 2
    assert "only ECDSA P-256 and Ed25519" in capsys.readouterr().err
    # Not a key at all; a missing image; a certificate file that is not PEM.
    files.key.write_text("hello")
    assert files.sign()[0] == 2
    files.key.write_bytes(files.pub.leaf.key_pem)
    files.cert.write_text("not a certificate")
    assert files.sign()[0] == 2
    assert "cert" in capsys.readouterr().err


def test_sign_without_pcrs_is_refused(files: Files, capsys: pytest.CaptureFixture[str]) -> None:
    out = files.tmp / "m.json"
    code = main(
        [
            "image",
            "sign",
            str(files.image),
            "--key",
            str(files.key),
            "--cert",
            str(files.cert),
            "-o",
            str(out),
        ]
    )
    assert code == 2 and not out.exists()
    assert "at least one --pcr" in capsys.readouterr().err


def test_verify_usage_errors(files: Files, capsys: pytest.CaptureFixture[str]) -> None:
    _, manifest = files.sign()
    assert main(["image", "verify", str(files.image), str(manifest)]) == 2
    assert "--trust-root" in capsys.readouterr().err
    assert files.verify(manifest, image=files.tmp / "missing.qcow2") == 2
    assert "image_unreadable" in capsys.readouterr().err
    assert files.verify(files.tmp / "missing.json") == 2
    bad_root = files.tmp / "bad-root.pem"
    bad_root.write_text("nope")
    assert (
        main(["image", "verify", str(files.image), str(manifest), "--trust-root", str(bad_root)])
        == 2
    )
    assert "trust_store_invalid" in capsys.readouterr().err
    assert files.verify(manifest, "--at", "yesterday") == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["image", "verify"])
    assert exit_info.value.code == 2


def test_oversized_or_garbage_manifest_is_invalid(
    files: Files, capsys: pytest.CaptureFixture[str]
) -> None:
    big = files.tmp / "big.json"
    big.write_bytes(b" " * (1024 * 1024 + 10))
    assert files.verify(big) == 1
    assert "image_manifest_too_large" in capsys.readouterr().err
    junk = files.tmp / "junk.json"
    junk.write_bytes(b"\x00\x01binary")
    assert files.verify(junk) == 1
    assert "image_manifest_malformed" in capsys.readouterr().err


def test_installed_command_exit_codes(files: Files) -> None:
    # Through a real process, as an operator or CI job runs it.
    import subprocess
    import sys

    _, manifest = files.sign()
    base = [
        sys.executable,
        "-m",
        "sandboxsec.cli",
        "image",
        "verify",
        str(files.image),
        str(manifest),
    ]
    ok = subprocess.run(
        [*base, "--trust-root", str(files.root)], capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0, ok.stderr
    other = files.tmp / "other.pem"
    other.write_bytes(make_publisher().root.pem)
    bad = subprocess.run(
        [*base, "--trust-root", str(other)], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 1 and "cert_untrusted_issuer" in bad.stderr


def test_bundle_in_any_order(files: Files, capsys: pytest.CaptureFixture[str]) -> None:
    # One PEM file holding intermediate, root and leaf in that order.
    files.cert.write_bytes(files.chain.read_bytes() + files.pub.leaf.pem)
    out = files.tmp / "bundle.dsse.json"
    args = ["image", "sign", str(files.image), "--key", str(files.key), "--cert", str(files.cert)]
    code = main([*args, "--pcr", f"0={PCR0}", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert files.verify(out) == 0


def test_verify_at_a_time_before_signing(files: Files, capsys: pytest.CaptureFixture[str]) -> None:
    # An auditor asking "was this image signed when the session ran an hour ago?" gets no.
    _, manifest = files.sign()
    earlier = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    capsys.readouterr()
    assert files.verify(manifest, "--at", earlier) == 1
    assert "invalid: image_manifest_not_yet_valid" in capsys.readouterr().err
