"""Packaged data has one source, inside the package; the top-level examples stay valid."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from sandboxsec.api.authz import permissions_of, role_table
from sandboxsec.policy.engine import bundled_default_policy, bundled_model, compile_policy

ROOT = Path(__file__).resolve().parents[3]


def test_packaged_data_is_read_from_the_package() -> None:
    assert "[matchers]" in bundled_model()
    assert compile_policy(bundled_default_policy()).rules
    assert role_table() and "action:request" in permissions_of("agent")
    assert resources.files("sandboxsec.api").joinpath("data", "roles.csv").is_file()


def test_no_packaged_file_has_a_top_level_twin() -> None:
    # One source per file: a second copy would have to be kept equal by hand.
    packaged = [
        *resources.files("sandboxsec.policy").joinpath("data").iterdir(),
        *resources.files("sandboxsec.api").joinpath("data").iterdir(),
    ]
    names = {p.name for p in packaged}
    top = {p.name for p in (ROOT / "policies").glob("*")}
    assert not names & top, f"copies of packaged data at the top level: {sorted(names & top)}"


@pytest.mark.parametrize("example", sorted((ROOT / "policies").glob("*.csv")), ids=lambda p: p.name)
def test_example_policies_compile(example: Path) -> None:
    compiled = compile_policy(example.read_text("utf-8"))
    assert compiled.rules
