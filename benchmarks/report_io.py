"""What every benchmark script ends with: OUT.json ({"meta", "rows"}) and OUT.md side by side, the
command line and the machine record in the meta."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from diffquant.eval.report import environment_record  # noqa: E402
from diffquant.jsonio import write_json  # noqa: E402


def write_report(out: str | Path, script: str, argv: list[str] | None, meta: dict, rows: list[dict],
                 markdown: Callable[[list[dict], dict], str]) -> Path:
    """Write ``out``.json and ``out``.md (``markdown(rows, meta)``); returns the .md path."""
    meta = {**meta, "command": f"python3 benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv),
            "environment": environment_record()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), {"meta": meta, "rows": rows})
    out.with_suffix(".md").write_text(markdown(rows, meta))
    print(f"wrote {out.with_suffix('.md')}")
    return out.with_suffix(".md")
