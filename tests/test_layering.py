"""The package's layering (docs/architecture.md, "Layers"), as the import-linter contracts in
pyproject.toml check it: a module imports only from layers below it, and no package has
import cycles between its modules and subpackages.

(a) the contracts hold on this tree; (b) an upward import breaks the build, shown on a
copy of the package; (c) no cycles, checked with grimp directly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS_CONTRACT = "Layers: a module imports only from layers below it"


def _lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    script = shutil.which("lint-imports", path=os.path.dirname(sys.executable))
    cmd = ([script] if script else
           [sys.executable, "-c",
            "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())"])
    env = dict(os.environ, COLUMNS="200")  # no wrapped lines in the report
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([*cmd, "--no-cache"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_contracts_kept() -> None:
    out = _lint_imports(REPO)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "0 broken" in text and "BROKEN" not in text, text
    assert f"{LAYERS_CONTRACT} KEPT" in text, text


def test_upward_import_fails_the_build(tmp_path: Path) -> None:
    shutil.copytree(REPO / "radixserve", tmp_path / "radixserve",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    req = tmp_path / "radixserve" / "core" / "req.py"
    with open(req, "a", encoding="utf-8") as f:
        f.write("\nfrom radixserve.managers import scheduler  # upward\n")
    out = _lint_imports(tmp_path, pythonpath=tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert f"{LAYERS_CONTRACT} BROKEN" in text, text
    assert "radixserve.core is not allowed to import radixserve.managers" in text, text
    assert "radixserve.core.req -> radixserve.managers.scheduler" in text, text


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("radixserve", exclude_type_checking_imports=True, cache_dir=None)


def _packages(graph: grimp.ImportGraph, root: str = "radixserve") -> list[str]:
    return [root, *sorted(m for m in graph.find_descendants(root) if graph.find_children(m))]


def test_no_import_cycles(graph: grimp.ImportGraph) -> None:
    """Between the children of every package (radixserve's subpackages, layers/'s
    modules, ...): the imports that would have to go to make each acyclic."""
    cycles = {pkg: sorted(breakers) for pkg in _packages(graph)
              if (breakers := graph.nominate_cycle_breakers(pkg))}
    assert not cycles, cycles


@pytest.mark.parametrize("a, b", [
    ("radixserve.model_executor.model_runner", "radixserve.model_executor.cuda_graph_runner"),
    ("radixserve.layers.attention.base", "radixserve.layers.radix_attention"),
    ("radixserve.layers.radix_attention", "radixserve.core.forward_batch"),
    ("radixserve.layers.attention", "radixserve.layers.triton_kernels"),
])
def test_former_cycles_are_gone(graph: grimp.ImportGraph, a: str, b: str) -> None:
    assert not (graph.chain_exists(a, b, as_packages=True)
                and graph.chain_exists(b, a, as_packages=True))
