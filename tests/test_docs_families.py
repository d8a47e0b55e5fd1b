"""docs/gpt2-to-llama-qwen-gemma.md, run: its ```python snippets, in order, in one namespace, so that the
page's checks stay true."""

from __future__ import annotations

import re

from tests.conftest import REPO

PAGE = REPO / "docs" / "gpt2-to-llama-qwen-gemma.md"


def test_the_families_page_snippets_run(capsys):
    snippets = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)
    assert len(snippets) == 7
    namespace: dict = {}
    for i, code in enumerate(snippets, 1):
        exec(compile(code, f"{PAGE.name} snippet {i}", "exec"), namespace)
    assert "query heads" in capsys.readouterr().out
