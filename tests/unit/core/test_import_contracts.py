"""The import contracts hold, fail when broken, and no module of the package imports in a circle.

The contracts themselves live in ``pyproject.toml`` (``[tool.importlinter]``) and run as
``lint-imports`` in ``scripts/test.sh``; these tests show that each one catches what it is
there for, by breaking a copy of the package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT), "--no-cache", "--no-logo", "--config", str(root / "pyproject.toml")],
        cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False,
    )


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """A copy of the package and its contracts that a test may break."""
    shutil.copytree(ROOT / "sandboxsec", tmp_path / "sandboxsec",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_contracts_hold() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_copy_is_clean(copy: Path) -> None:
    assert _lint(copy).returncode == 0


@pytest.mark.parametrize(
    ("module", "source", "contract"),
    [
        # a domain reaching for the container instead of naming its collaborators
        ("sandboxsec/policy/sneaky.py", "import sandboxsec.services\n",
         "only the edges (api, cli) import the composition root"),
        # a pure module importing the ORM
        ("sandboxsec/policy/canonical_extra.py", "import sqlmodel\n", None),
        # a lower layer importing a higher one
        ("sandboxsec/audit/upward.py", "import sandboxsec.policy.decisions\n",
         "no domain reaches up"),
    ],
    ids=["service-locator", "pure-imports-orm", "upward-import"],
)
def test_a_violation_breaks_the_build(copy: Path, module: str, source: str,
                                      contract: str | None) -> None:
    (copy / module).write_text(source)
    if contract is None:
        # Make a pure module import the new one: the ORM is now reachable from the core.
        engine = copy / "sandboxsec/policy/canonical.py"
        engine.write_text(engine.read_text() + "\nimport sandboxsec.policy.canonical_extra\n")
        contract = "the pure core imports no web, ORM or storage code"
    result = _lint(copy)
    assert result.returncode != 0
    assert f"{contract}" in result.stdout and "BROKEN" in result.stdout, result.stdout


_FIND_CYCLES = """
import json, grimp
graph = grimp.build_graph("sandboxsec", cache_dir=None)
modules = sorted(graph.modules)
edges = {m: sorted(set(graph.find_modules_directly_imported_by(m)) & set(modules))
         for m in modules}
# Tarjan's strongly connected components, iteratively: any component of two or more modules
# is an import circle.
index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], 0
for start in modules:
    if start in index:
        continue
    work = [(start, 0)]
    while work:
        node, i = work.pop()
        if i == 0:
            index[node] = low[node] = counter
            counter += 1
            stack.append(node)
            on_stack.add(node)
        if i < len(edges[node]):
            work.append((node, i + 1))
            nxt = edges[node][i]
            if nxt not in index:
                work.append((nxt, 0))
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
            continue
        if work:
            parent = work[-1][0]
            low[parent] = min(low[parent], low[node])
        if low[node] == index[node]:
            comp = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                comp.append(member)
                if member == node:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))
print(json.dumps(found))
"""


def _cycles(package_root: Path) -> list[list[str]]:
    # A fresh interpreter, so the package found is the one under ``package_root``.
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    result = subprocess.run([sys.executable, "-c", _FIND_CYCLES], cwd=package_root, env=env,
                            capture_output=True, text=True, timeout=120, check=True)
    found: list[list[str]] = json.loads(result.stdout)
    return found


def test_no_import_circle_among_modules() -> None:
    # Every import counts, also those under TYPE_CHECKING or inside a function.
    assert _cycles(ROOT) == []


def test_an_import_circle_is_found(copy: Path) -> None:
    (copy / "sandboxsec/ids.py").write_text(
        (copy / "sandboxsec/ids.py").read_text() + "\nimport sandboxsec.principal\n")
    principal = copy / "sandboxsec/principal.py"
    principal.write_text(principal.read_text() + "\nimport sandboxsec.ids\n")
    assert ["sandboxsec.ids", "sandboxsec.principal"] in _cycles(copy)
