"""Every Python snippet in docs/ runs as written."""

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
SNIPPETS = [
    pytest.param(code, id=f"{path.name}:{i}")
    for path in sorted(DOCS.glob("*.md"))
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S))
    if "# not run" not in code
]


@pytest.mark.parametrize("code", SNIPPETS)
def test_doc_snippet_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<doc snippet>", "exec"), {"__name__": "__doc_snippet__"})
