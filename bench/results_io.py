"""What every benchmark script shares: writing its JSON result atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(out: Path, result: dict) -> None:
    """Written under a temporary name in the destination folder, then renamed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
