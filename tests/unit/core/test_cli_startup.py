"""A command imports its own group only: a witness, the gateway or an auditor's offline check
start without loading the service's storage, policy engine or web framework."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sandboxsec.cli import GROUPS, main

_HEAVY = ("sqlmodel", "fastapi", "sandboxsec.storage.db", "sandboxsec.policy.service")


def _modules_after(words: list[str]) -> list[str]:
    script = (
        "import json, sys\n"
        "from sandboxsec.cli import main\n"
        "try:\n"
        f"    main({words!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(json.dumps([m for m in {list(_HEAVY)!r} if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True)
    loaded: list[str] = json.loads(out.stdout.strip().splitlines()[-1])
    return loaded


@pytest.mark.parametrize("words", [["gateway", "--help"], ["audit", "verify", "--help"],
                                   ["witness", "--help"]])
def test_a_light_command_does_not_import_the_service(words: list[str]) -> None:
    assert _modules_after(words) == []


def test_the_full_command_list_is_still_offered() -> None:
    # No group named: every group is registered (the usage error lists them all).
    result = subprocess.run([sys.executable, "-m", "sandboxsec.cli", "no-such-command"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    for name in GROUPS:
        assert repr(name) in result.stderr


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_parses_on_its_own(group: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([group, "--help"])
    assert exit_.value.code == 0
    assert f"usage: sandboxsec {group}" in capsys.readouterr().out
