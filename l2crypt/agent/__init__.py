"""The host agent (``l2crypt``): its daemon, config, CLI, key-server client, enrollment and TLS
files."""
