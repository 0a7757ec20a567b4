"""``sandboxsec keys``: the operator's rotation commands on the embedded database."""

from __future__ import annotations

import pytest

from sandboxsec.cli import main
from sandboxsec.settings import Settings
from tests.support.cli import cli_json


def test_rotate_rewrap_retire_status(settings: Settings,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    # Operator commands never create a database: it is made on purpose first.
    assert main(["migrate"]) == 0
    capsys.readouterr()
    assert main(["tenant", "create", "bank-a"]) == 0
    tenant_id = cli_json(capsys.readouterr().out)["tenant_id"]
    assert main(["keys", "rotate", "--tenant", "bank-a"]) == 0
    assert cli_json(capsys.readouterr().out)["current_version"] == 2
    assert main(["keys", "rotate", "--tenant", tenant_id, "--rewrap"]) == 0
    out = cli_json(capsys.readouterr().out)
    assert out["current_version"] == 3 and out["rewrapped"] == 0
    assert main(["keys", "rewrap", "--tenant", "bank-a"]) == 0
    assert cli_json(capsys.readouterr().out)["version"] == 3
    assert main(["keys", "retire", "--tenant", "bank-a", "--min-version", "2"]) == 0
    assert cli_json(capsys.readouterr().out)["min_decryption_version"] == 2
    assert main(["keys", "status", "--tenant", "bank-a"]) == 0
    status = cli_json(capsys.readouterr().out)
    assert [v["version"] for v in status["versions"]] == [1, 2, 3]
    assert (settings.home / "root.key").stat().st_mode & 0o777 == 0o600


def test_errors_exit_2(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    # Operator commands never create a database: it is made on purpose first.
    assert main(["migrate"]) == 0
    capsys.readouterr()
    assert main(["keys", "rotate", "--tenant", "nobody"]) == 2
    assert "not_found" in capsys.readouterr().err
    main(["tenant", "create", "bank-b"])
    capsys.readouterr()
    assert main(["keys", "retire", "--tenant", "bank-b", "--min-version", "1"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["keys", "rotate"])
    assert exc.value.code == 2
