"""The README's code examples run as written."""

from __future__ import annotations

import re

from conftest import REPO_ROOT


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.S)
    runnable = [b for b in blocks if "logits = model" in b]
    assert runnable, "the README lost its DLRM example"
    for block in runnable:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)
        assert tuple(namespace["logits"].shape) == (2, 1)
