"""The layer-3 agent (``l2crypt l3-agent``): its daemon, config, CLI, key-server client and
status."""
