"""The core takes bytes and a clock value: it imports no socket, asyncio, time or fcntl."""

import ast
from pathlib import Path

import pytest

CORE = ["msg_codec", "frame_wire", "aead", "replay", "peer_keys", "hold_queue", "engine", "ks_messages", "constants", "fakes",
        "l3_wire", "l3_pmtu", "l3_types", "l3_engine", "replay_floor", "key_ring", "engine_keys", "tunnel_keys",
        "vnet_hdr", "gso", "gro"]
FORBIDDEN = {"socket", "asyncio", "time", "fcntl", "select", "selectors", "subprocess", "os"}
ROOT = Path(__file__).resolve().parent.parent / "l2crypt"


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", CORE)
def test_core_module_does_no_io(module):
    assert not imported(next(ROOT.rglob(f"{module}.py"))) & FORBIDDEN


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: p.name)
def test_modules_stay_small(path):
    assert len(path.read_text().splitlines()) <= 600
