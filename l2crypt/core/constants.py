"""Constants, kept in two groups as wireguard-go's constants.go does.

Wire and spec constants change the bytes on the wire: changing one breaks
interoperability.  Tuning constants are defaults that a config file may
override; changing one changes behaviour, never the format.
"""

# --- wire and spec constants -------------------------------------------------

#: EtherType of l2crypt data frames (IEEE "local experimental" 1).
DEFAULT_ETHERTYPE = 0x88B5
#: Data-frame format version carried in every header.
FRAME_VERSION = 1
#: Version 2: the same layout; the top bit of the key-id byte is a flag
#: (``KEY_FLAG_CSUM_PARTIAL``).  Senders use it only for a frame with a flag
#: set, so a frame without flags stays readable by every version-1 receiver.
FRAME_VERSION_FLAGS = 2
#: Flag (version 2): the inner TCP/UDP checksum was left to the receiver (the
#: field holds the pseudo-header sum; the AEAD tag already proves the bytes).
KEY_FLAG_CSUM_PARTIAL = 0x80
#: The key-id bits of the key-id byte of a version-2 frame.
KEY_ID_MASK = 0x7F
#: Key ids: which family of key sealed the frame.
KEY_ID_PAIR = 1
KEY_ID_MULTICAST = 2
#: Bytes of the MAC header kept in clear (DA + SA).
MAC_HEADER_LEN = 12
#: Bytes of the l2crypt header after the MACs: EtherType, version, key id,
#: PW_ID (u32), packet number (u64).
L2C_HEADER_LEN = 16
#: The AEAD tag.
TAG_LEN = 16
#: Overhead of a sealed frame over the plain one: the l2crypt header plus the
#: tag (the original EtherType moves inside the ciphertext).
FRAME_OVERHEAD = L2C_HEADER_LEN + TAG_LEN  # 32, the same as MACsec with SCI
#: Smallest plain frame we seal: a MAC header plus an EtherType plus 14 bytes.
#: Keeps every sealed frame >= 60 bytes, so no NIC pads it (padding would
#: break the tag).
MIN_PLAIN_FRAME = 28
#: Largest packet number.  Senders rekey long before it.
MAX_PACKET_NUMBER = 2**64 - 1
#: The largest key-server message body, in bytes.
MAX_MESSAGE_BYTES = 64 * 1024
#: Fixed TLS server name every key server certificate carries.  Clients verify
#: it, so a host certificate (which never carries it) cannot act as a server.
KEYSERVER_TLS_NAME = "keyserver.l2crypt"

# --- tuning constants (defaults) ---------------------------------------------

DEFAULT_REPLAY_WINDOW_FRAMES = 2048
DEFAULT_HOLD_FRAMES = 16          # per pending MAC, like the kernel's unres_qlen
DEFAULT_HOLD_AGE_S = 2.0
DEFAULT_MAX_PENDING_KEYS = 1024  # MACs with an outstanding key request, all together
DEFAULT_KEY_REQUESTS_PER_S = 50.0  # key requests an agent sends per second at most (burst: as many)
DEFAULT_KEY_RETRY_S = 0.5         # first retry of an unanswered key request
DEFAULT_KEY_RETRY_MAX_S = 8.0     # backoff ceiling
DEFAULT_UNKNOWN_CACHE_S = 5.0     # how long an "unknown MAC" answer is believed
DEFAULT_SWITCH_AFTER_S = 2.0      # a sender moves to a pushed key at the latest after this
DEFAULT_RETIRE_AFTER_S = 30.0     # an old key version is kept this long after the switch
DEFAULT_KEY_MAX_AGE_S = 7200.0    # a key version made longer ago than this at the key server is not used
DEFAULT_REKEY_AFTER_FRAMES = 2**32  # frames under one pair key before the sender asks for a new one
DEFAULT_WIRE_MTU = 1500
DEFAULT_KEYSERVER_PORT = 7788
