"""The README's parts table names every module of every package folder it lists.

A row reads ``| `l2crypt/core/` | what ... (`aead`, `constants`, ...) |``: each
``.py`` module of that folder (``__init__`` aside) stands in it in backticks,
and each name in backticks that looks like a module is one.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("l2crypt/core/", "l2crypt/io/", "l2crypt/agent/", "l2crypt/l3/", "l2crypt/ops/", "l2crypt/lab/",
           "keyserverd/", "keyserverd/store/", "keyserverd/peering/", "gateway/")


def parts_table(readme: str) -> dict[str, str]:
    """The README's table rows by folder: {"l2crypt/core/": "the row's text"}."""
    rows = {}
    for line in readme.splitlines():
        m = re.match(r"\| `([\w/]+/)` \| (.*) \|$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def missing_modules(folder: str, row: str) -> list[str]:
    named = set(re.findall(r"`(\w+)`", row))
    modules = {p.stem for p in (ROOT / folder).glob("*.py") if p.stem != "__init__"}
    return sorted(modules - named)


def test_the_parts_table_names_every_module():
    rows = parts_table((ROOT / "README.md").read_text())
    assert set(FOLDERS) <= set(rows), f"folders without a row: {sorted(set(FOLDERS) - set(rows))}"
    missing = {folder: missing_modules(folder, rows[folder]) for folder in FOLDERS}
    assert {k: v for k, v in missing.items() if v} == {}


def test_a_module_left_out_is_found():
    rows = parts_table("| `l2crypt/core/` | the core (`aead`, `engine`) |\n")
    assert rows == {"l2crypt/core/": "the core (`aead`, `engine`)"}
    assert "replay" in missing_modules("l2crypt/core/", rows["l2crypt/core/"])
