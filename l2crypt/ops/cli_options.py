"""Command-line options made from a config dataclass's fields.

Every config key has a CLI override (``hold_age_s`` is ``--hold-age-s``).
``config_option`` makes one from the field (its type and its one-line
description); ``tuning_options`` makes those of the engine tuning keys
(``EngineTuning``, ``FrameTuning``) a daemon's config has, so the host
agent, the layer-3 agent and the gateway take the same options.
"""

from __future__ import annotations

import dataclasses

import click

from l2crypt.agent.config import KEY_CLIENT_KEYS, FrameTuning

#: Field annotation (a string: the configs use postponed annotations) -> click type.
_TYPES = {"int": int, "float": float}


def config_option(cls, name: str, show_default: bool = True):
    """``--NAME`` for field ``name`` of ``cls``, typed by the field, with its description."""
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    doc = field.metadata["doc"]
    if show_default and field.default not in (None, ""):
        doc += f" [default: {field.default}]"
    return click.option("--" + name.replace("_", "-"), name, type=_TYPES.get(str(field.type), str), help=doc)


def tuning_options(cls) -> list:
    """The options of the tuning keys ``cls`` (a daemon's config) has, in their order."""
    names = {f.name for f in dataclasses.fields(cls)}
    return [config_option(cls, f.name) for f in dataclasses.fields(FrameTuning) if f.name in names]


def key_client_cli_options(cls) -> list:
    """The options of the key-server failover and reconnect keys (``probe_interval_s`` ...)."""
    return [config_option(cls, name) for name in KEY_CLIENT_KEYS]
