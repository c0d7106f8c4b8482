"""The README's Python snippet runs as written, from the repository root, on the bundled model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _first_python_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README.md has no ```python block"
    return blocks[0]


@pytest.mark.slow
def test_the_readme_snippet_runs_as_written(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(_first_python_block(), "README.md", "exec"), namespace)  # nothing defined beforehand
    out = capsys.readouterr().out
    assert "Fellow citizens, the state of the Union" in out and "def parse_args(argv):" in out, out
    stats = namespace["model"].offload_stats()
    assert stats["misses"] > 0 and namespace["model"].offload_engine.host_slots < 6 * 16  # 25% of the experts
