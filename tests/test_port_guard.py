"""The port guard's nftables rule set and the reading of its JSON listing (no kernel).

The lab tests (netns_tests/test_inbound_guard.py) show that the kernel takes the
rule set and that the readings move with real frames.
"""

import copy

import pytest

from l2crypt.io import nft_json
from l2crypt.io.port_guard import EGRESS_COUNTER, INBOUND_COUNTER, PortGuard, table_name

L2C = 0x88B5

#: ``nft -j list table netdev l2crypt_d0`` (nft 1.0.6, kernel 6.18) of the table
#: ``PortGuard("d0", 0x88B5).install()`` made, after 7 frames were refused inbound
#: and 3 blocked outbound.  nft 1.0.6 leaves the device out of a netdev chain.
LISTING = [
    {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
    {"table": {"family": "netdev", "name": "l2crypt_d0", "handle": 3}},
    {"counter": {"family": "netdev", "name": "inbound_refused", "table": "l2crypt_d0", "handle": 1,
                 "packets": 7, "bytes": 602}},
    {"counter": {"family": "netdev", "name": "egress_blocked", "table": "l2crypt_d0", "handle": 2,
                 "packets": 3, "bytes": 258}},
    {"chain": {"family": "netdev", "table": "l2crypt_d0", "name": "ingress", "handle": 3, "type": "filter",
               "hook": "ingress", "prio": 0, "policy": "drop"}},
    {"chain": {"family": "netdev", "table": "l2crypt_d0", "name": "egress", "handle": 6, "type": "filter",
               "hook": "egress", "prio": 0, "policy": "drop"}},
    {"rule": {"family": "netdev", "table": "l2crypt_d0", "chain": "ingress", "handle": 4, "expr": [
        {"match": {"op": "==", "left": {"payload": {"protocol": "ether", "field": "type"}}, "right": 34997}},
        {"accept": None}]}},
    {"rule": {"family": "netdev", "table": "l2crypt_d0", "chain": "ingress", "handle": 5, "expr": [
        {"counter": "inbound_refused"}, {"drop": None}]}},
    {"rule": {"family": "netdev", "table": "l2crypt_d0", "chain": "egress", "handle": 7, "expr": [
        {"match": {"op": "==", "left": {"payload": {"protocol": "ether", "field": "type"}}, "right": 34997}},
        {"accept": None}]}},
    {"rule": {"family": "netdev", "table": "l2crypt_d0", "chain": "egress", "handle": 8, "expr": [
        {"counter": "egress_blocked"}, {"drop": None}]}},
]


def listing_of(guard: PortGuard, packets: int = 0) -> list[dict]:
    """What nft would list after running ``guard.ruleset()``: its objects with handles."""
    out = [{"metainfo": {"json_schema_version": 1}}]
    handle = 0
    for cmd in guard.ruleset()[2:]:  # the add + delete pair only empties an old table
        (kind, obj), = cmd["add"].items()
        handle += 1
        obj = {**copy.deepcopy(obj), "handle": handle}
        obj.pop("dev", None)
        if kind == "counter":
            obj.update(packets=packets, bytes=packets * 60)
        out.append({kind: obj})
    return out


# --- the rule set -----------------------------------------------------------------------


def test_wire_guard_rule_set_replaces_the_table_in_one_batch():
    cmds = PortGuard("eth0", L2C).ruleset()
    table = {"family": "netdev", "name": "l2crypt_eth0"}
    assert cmds[:3] == [{"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}}]
    assert all(list(c) == ["add"] for c in cmds[3:])  # nothing else is deleted
    chains = [c["add"]["chain"] for c in cmds if "chain" in c.get("add", {})]
    assert [(c["name"], c["hook"], c["dev"], c["policy"], c["type"]) for c in chains] == [
        ("ingress", "ingress", "eth0", "drop", "filter"), ("egress", "egress", "eth0", "drop", "filter")]
    counters = [c["add"]["counter"]["name"] for c in cmds if "counter" in c.get("add", {})]
    assert counters == [INBOUND_COUNTER, EGRESS_COUNTER]
    # Counters and chains come before the rules that use them.
    kinds = [next(iter(c["add"])) for c in cmds[3:]]
    assert kinds.index("rule") > max(i for i, k in enumerate(kinds) if k == "counter")


@pytest.mark.parametrize("chain,counter", [("ingress", INBOUND_COUNTER), ("egress", EGRESS_COUNTER)])
def test_wire_guard_passes_only_the_l2crypt_ethertype(chain, counter):
    rules = [c["add"]["rule"]["expr"] for c in PortGuard("eth0", L2C).ruleset()
             if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == chain]
    match = {"match": {"op": "==", "left": {"payload": {"protocol": "ether", "field": "type"}}, "right": L2C}}
    assert rules == [[match, {"accept": None}], [{"counter": counter}, {"drop": None}]]


def test_plain_port_guard_drops_everything_inbound_and_has_no_egress_chain():
    guard = PortGuard("plain0", None, egress=False)
    cmds = guard.ruleset()
    assert [c["add"]["chain"]["hook"] for c in cmds if "chain" in c.get("add", {})] == ["ingress"]
    assert [c["add"]["rule"]["expr"] for c in cmds if "rule" in c.get("add", {})] == [
        [{"counter": INBOUND_COUNTER}, {"drop": None}]]
    assert not any("accept" in str(c) for c in cmds)


def test_table_name_is_safe_for_any_port_name():
    assert table_name("eth0") == "l2crypt_eth0"
    assert table_name("enp1s0.100") == "l2crypt_enp1s0_100"
    assert table_name("br-lan:1") == "l2crypt_br_lan_1"


# --- reading the listing ---------------------------------------------------------------------


def test_reading_of_a_real_listing():
    assert PortGuard("d0", L2C).reading(LISTING) == {
        "port_guard": "intact", INBOUND_COUNTER: 7, EGRESS_COUNTER: 3}


def test_reading_of_what_the_rule_set_makes_is_intact():
    for guard in (PortGuard("eth0", L2C), PortGuard("plain0", None, egress=False), PortGuard("x", 0x1234)):
        reading = guard.reading(listing_of(guard, packets=5))
        assert reading["port_guard"] == "intact", guard
        assert reading[INBOUND_COUNTER] == 5
        assert reading.get(EGRESS_COUNTER, 5) == 5
    assert EGRESS_COUNTER not in PortGuard("plain0", None, egress=False).reading(None)


def test_missing_table():
    assert PortGuard("d0", L2C).reading(None) == {"port_guard": "missing", INBOUND_COUNTER: None,
                                                   EGRESS_COUNTER: None}


def _altered(edit) -> dict:
    listing = copy.deepcopy(LISTING)
    edit(listing)
    return PortGuard("d0", L2C).reading(listing)


@pytest.mark.parametrize("what,edit", [
    ("egress policy accept", lambda ls: ls[5]["chain"].update(policy="accept")),
    ("ingress chain gone", lambda ls: ls.pop(4)),
    ("egress drop rule gone", lambda ls: ls.pop(9)),
    ("an accept-all rule first", lambda ls: ls.insert(6, {"rule": {
        "family": "netdev", "table": "l2crypt_d0", "chain": "ingress", "handle": 9, "expr": [{"accept": None}]}})),
    ("another EtherType passes", lambda ls: ls[8]["rule"]["expr"][0]["match"].update(right=0x0800)),
    ("ingress hooked as egress", lambda ls: ls[4]["chain"].update(hook="egress")),
])
def test_altered_guard_is_reported(what, edit):
    reading = _altered(edit)
    assert reading["port_guard"] == "altered", what


def test_counter_gone_reads_none_and_altered():
    reading = _altered(lambda ls: ls.pop(3))
    assert reading == {"port_guard": "altered", INBOUND_COUNTER: 7, EGRESS_COUNTER: None}


def test_objects_of_another_table_are_ignored():
    other = copy.deepcopy(LISTING)
    for item in other[1:]:
        next(iter(item.values()))["table" if "table" not in item else "name"] = "l2crypt_d1"
    assert PortGuard("d0", L2C).reading(other)["port_guard"] == "altered"
    assert PortGuard("d1", L2C).reading(other) == {"port_guard": "intact", INBOUND_COUNTER: 7, EGRESS_COUNTER: 3}


def test_objects_skips_what_is_not_an_object_of_that_kind():
    assert nft_json.objects([{"counter": {"name": "a"}}, {"counter": "x"}, "junk", {"rule": {}}], "counter") == [
        {"name": "a"}]


# --- the status line -------------------------------------------------------------------------


def test_status_line_names_the_state_and_the_counts():
    from rich.console import Console

    from l2crypt.ops.status_view import guard_line

    doc = {"port": "eth0", "port_guard": "intact", INBOUND_COUNTER: 60, EGRESS_COUNTER: 4}
    assert guard_line(doc, "eth0") == \
        "port guard on eth0: intact   frames refused inbound: 60   frames blocked outbound: 4"
    console = Console(record=True, width=120)
    console.print(guard_line({"port_guard": "altered", INBOUND_COUNTER: 1, EGRESS_COUNTER: None}, "eth0"))
    console.print(guard_line({"port_guard": "missing", INBOUND_COUNTER: None, EGRESS_COUNTER: None}, "eth0"))
    assert console.export_text().splitlines() == [
        "port guard on eth0: ALTERED (not as installed)   frames refused inbound: 1",
        "port guard on eth0: MISSING (plain frames pass)"]
    assert guard_line({"port": "eth0"}, "eth0") is None  # an agent from before the inbound guard
