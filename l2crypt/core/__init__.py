"""The sans-I/O core: wire formats, AEAD, replay windows, key rings, peer keys, hold queue and the
frame engines; it takes bytes and a clock value and imports no socket, asyncio, os, time or
subprocess, as tests/test_layout_rules.py checks."""
