"""l2crypt: a Linux layer-2 encrypting switch.

The package is split in two halves:

* a sans-I/O core (``frame_wire``, ``aead``, ``replay``, ``peer_keys``, ``peer_table``,
  ``hold_queue``, ``engine``, ``ks_messages``) that takes bytes and a clock value
  and returns bytes plus actions, and imports no socket, asyncio or time;
* the I/O shell (``linux_tap``, ``linux_wire``, ``wire_ring``, ``port_guard``, ``nft_json``,
  ``keyclient``, ``agent``, ``cli``) that moves bytes between the kernel, the key
  server and the core.
"""

__version__ = "0.1.0"
