"""docs/configuration.md documents every config key, and names no key that does not exist.

The keys are the fields of the config dataclasses; the docs' keys are the
first cells of the tables in the daemon's section (``| `key` | ...``), plus,
for a daemon whose config has the engine tuning keys, those of the shared
"Engine tuning" section (one table for the agent, the layer-3 agent and the
gateway).
"""

import dataclasses
import importlib
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
#: Section title -> "module:Class" of its config dataclass.  The gateway's
#: section is checked against its dataclass once ``gateway.config`` exists.
SECTIONS = {
    "Agent": "l2crypt.agent.config:AgentConfig",
    "Key server": "keyserverd.config:KeyServerConfig",
    "Gateway": "gateway.config:GatewayConfig",
    "Layer-3 agent": "l2crypt.l3.config:L3AgentConfig",
}
#: The shared section of the engine tuning keys, and the dataclass with all of them.
TUNING = ("Engine tuning", "l2crypt.agent.config:FrameTuning")
ROW = re.compile(r"^\|\s*`([a-z0-9_]+)`\s*\|")


def sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## +(.+?)\s*$", text, flags=re.M)
    return {title: body for title, body in zip(parts[1::2], parts[2::2])}


def documented(body: str) -> list[str]:
    return [m.group(1) for line in body.splitlines() if (m := ROW.match(line))]


def config_fields(target: str) -> set[str] | None:
    module, cls = target.split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError:
        return None
    return {f.name for f in dataclasses.fields(getattr(mod, cls))}


def takes_tuning(target: str) -> bool:
    """True if the config class inherits the engine tuning keys (the key server's does not)."""
    from l2crypt.agent.config import EngineTuning

    module, cls = target.split(":")
    return issubclass(getattr(importlib.import_module(module), cls), EngineTuning)


@pytest.mark.parametrize("title", SECTIONS)
def test_every_key_documented_and_no_other(title):
    body = sections(DOC.read_text()).get(title)
    assert body is not None, f"docs/configuration.md has no '## {title}' section"
    keys = config_fields(SECTIONS[title])
    named = documented(body)
    if keys is None:  # the daemon does not exist yet: its section must name no key
        assert named == [], f"{title}: the docs name keys of a config that does not exist: {named}"
        return
    assert len(named) == len(set(named)), f"{title}: a key is documented twice: {named}"
    tuning = set(documented(sections(DOC.read_text())[TUNING[0]])) & keys if takes_tuning(SECTIONS[title]) else set()
    assert not tuning & set(named), f"{title}: a tuning key is documented in both sections"
    named += sorted(tuning)
    assert sorted(keys - set(named)) == [], f"{title}: undocumented config keys"
    assert sorted(set(named) - keys) == [], f"{title}: the docs name keys that do not exist"


def test_the_tuning_section_names_every_tuning_key_and_no_other():
    named = documented(sections(DOC.read_text())[TUNING[0]])
    assert sorted(named) == sorted(config_fields(TUNING[1]))
    # Each daemon takes them (key_max_age_s: the layer-2 frame engines only).
    for title in ("Agent", "Gateway", "Layer-3 agent"):
        missing = set(named) - config_fields(SECTIONS[title])
        assert missing == (set() if title != "Layer-3 agent" else {"key_max_age_s"}), (title, missing)


def test_the_checker_sees_a_missing_and_an_extra_key():
    body = "| key | x |\n|---|---|\n| `port` | a |\n| `colour` | b |\n"
    assert documented(body) == ["port", "colour"]
    keys = config_fields(SECTIONS["Agent"])
    assert "colour" not in keys and "servers" in keys and "servers" not in documented(body)


def test_metrics_table_names_metrics_the_daemons_export():
    """Every metric the docs name in backquotes exists in the collectors' source."""
    text = sections(DOC.read_text())["Metrics"]
    names = set(re.findall(r"`((?:l2crypt|keyserverd)_[a-z0-9_]+)", text))
    root = DOC.parent.parent
    source = (root / "l2crypt" / "ops" / "metrics.py").read_text() + (root / "keyserverd" / "metrics.py").read_text() \
        + (root / "l2crypt" / "agent" / "keyclient.py").read_text() + (root / "gateway" / "metrics.py").read_text() \
        + (root / "l2crypt" / "l3" / "status.py").read_text()
    for name in names:
        base = re.sub(r"_total$", "", name)
        assert f'"{base}"' in source, f"docs name metric {name}, no collector makes it"
