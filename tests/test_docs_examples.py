"""The README's and docs' ```python examples run as written.

A block preceded by ``<!-- no-run: REASON -->`` (the line just above its fence) needs data that
it does not create; it is skipped with that reason, so the skip shows in ``pytest -ra``.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"(?:<!-- no-run: (?P<reason>.*?) -->\n)?```python\n(?P<code>.*?)```", re.S)


def _blocks():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        for m in _BLOCK.finditer(text):
            line = text.count("\n", 0, m.start("code"))
            yield pytest.param(m.group("code"), m.group("reason"), id=f"{doc.relative_to(ROOT)}:{line}")


@pytest.mark.parametrize(("code", "reason"), list(_blocks()))
def test_example_runs(code, reason, tmp_path, monkeypatch):
    if reason:
        pytest.skip(f"no-run: {reason}")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<example>", "exec"), {"__name__": "__example__"})
