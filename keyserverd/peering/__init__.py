"""Peering between key servers: the channel, its messages, the peer specs, and multicast keys,
NETKEY and revocations shared between peers."""
