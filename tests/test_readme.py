"""The README's code examples run as written."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def example(name: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- example: {re.escape(name)} .*?-->\s*```python\n(.*?)```", text, re.S)
    if match is None:
        pytest.fail(f"README has no example {name!r}")
    return match.group(1)


def test_any_module_example_quantizes_a_denoiser_the_zoo_does_not_know():
    scope: dict = {}
    exec(compile(example("any-module"), "README.md:any-module", "exec"), scope)
    qmodel, calls = scope["qmodel"], scope["calls"]
    assert len(calls) == 10  # one recorded call per sampling step
    assert qmodel.recipe == "qdiffusion" and qmodel.quant_config.weight_bits == 4
    assert {"inp", "mid", "out", "time.0", "time.2"} <= set(qmodel.layers())
    # quantized sampling stays close to float, yet really differs from it
    assert 0 < scope["error"] < 0.5 * float(scope["reference"].abs().mean())


def test_the_license_file_matches_the_package_metadata():
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    declared = tomllib.loads((root / "pyproject.toml").read_text())["project"]["license"]["text"]
    text = (root / "LICENSE").read_text()
    assert declared == "Apache-2.0" and "Apache License" in text and "Version 2.0, January 2004" in text
