"""The host's I/O behind narrow interfaces: TAP, wire socket, port guard (nftables), state files
and locks, the packet clock, and the in-memory fakes for tests."""
