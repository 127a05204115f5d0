"""The package's layering holds: the import contracts in .importlinter (layers, independent paper
modules in diffquant.methods, a float side that knows nothing of quantization) are kept."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def lint_imports_executable() -> str:
    beside = Path(sys.executable).parent / "lint-imports"  # the one of this interpreter's environment
    found = str(beside) if beside.is_file() else shutil.which("lint-imports")
    if found is None:
        pytest.skip("import-linter is installed but its lint-imports command is not on PATH")
    return found


def test_import_contracts_are_kept():
    pytest.importorskip("importlinter")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([lint_imports_executable(), "--no-cache", "--no-logo", str(ROOT / ".importlinter")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"import contracts broken (lint-imports):\n{result.stdout}\n{result.stderr}"


def test_the_version_module_agrees_with_the_package_metadata():
    """Lower layers read the version from diffquant._version, never from the package root (whose
    __init__ imports every layer); the root re-exports it."""
    import tomllib

    import diffquant
    from diffquant._version import __version__

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert diffquant.__version__ == __version__ == declared
