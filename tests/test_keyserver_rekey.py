"""Key server side of PW_ID rotation: conditional rotations, the event log,
the pushes it turns into, the two races, and revocation — without sockets."""

import logging

from keyserverd.service import KeyService, Session, revoke_and_rotate
from test_keyserver_service import MAC_A, MAC_B, MAC_C, NOW, bound, call, env, reply  # noqa: F401


def test_rotation_is_conditional_and_logged_as_events(env):
    service, store = env
    store.get_or_create_pair_key("a", "b", NOW)
    seq = store.last_event_seq()
    assert store.rotate_pair_key("a", "b", NOW + 1, if_pw_id=1) == 2
    assert store.rotate_pair_key("b", "a", NOW + 1, if_pw_id=1) is None       # the other end lost the race
    assert store.rotate_pair_key("a", "b", NOW + 2, if_created_before=NOW) is None  # too young
    assert [(e.kind, e.id1, e.id2, e.pw_id) for e in store.events_since(seq)] == [("pair", "a", "b", 2)]
    assert store.rotate_pair_key("a", "c", NOW) is None                        # no key yet: nothing to rotate


def test_pair_event_pushes_the_new_version_to_both_ends(env):
    service, store = env
    bound(service, "a", MAC_A), bound(service, "b", MAC_B)
    store.get_or_create_pair_key("a", "b", NOW)
    seq = store.last_event_seq()
    store.rotate_pair_key("a", "b", NOW + 5)
    actions = [a for e in store.events_since(seq) for a in service.on_event(e)]
    pushes = {target[1]: msg for target, msg in actions}
    assert pushes["a"]["peer_mac"] == MAC_B and pushes["b"]["peer_mac"] == MAC_A
    assert pushes["a"]["pw_id"] == pushes["b"]["pw_id"] == 2
    assert pushes["a"]["key"] == pushes["b"]["key"] == store.pair_key("a", "b", 2)


def test_data_volume_rekey_request_rotates_once(env):
    service, store = env
    sa, sb = bound(service, "a", MAC_A), bound(service, "b", MAC_B)
    reply(call(service, sa, {"t": "key_req", "rid": 2, "peer_mac": MAC_B}))
    first = reply(call(service, sa, {"t": "rekey_req", "rid": 3, "peer_mac": MAC_B, "pw_id": 1}))
    second = reply(call(service, sb, {"t": "rekey_req", "rid": 3, "peer_mac": MAC_A, "pw_id": 1}))
    assert first["pw_id"] == second["pw_id"] == 2 and first["key"] == second["key"]


def test_race_b_report_of_the_newest_pushes_it_again(env, caplog):
    service, store = env
    sa, sb = bound(service, "a", MAC_A), bound(service, "b", MAC_B)
    reply(call(service, sa, {"t": "key_req", "rid": 2, "peer_mac": MAC_B}))
    store.rotate_pair_key("a", "b", NOW + 1)
    with caplog.at_level(logging.INFO, logger="keyserverd"):
        actions = call(service, sa, {"t": "key_report", "rid": 4, "peer_mac": MAC_B, "pw_id": 2})
    assert reply(actions)["pw_id"] == 2
    pushes = [(t, m) for t, m in actions if t != "reply"]
    assert pushes == [(("push", "b"), {"t": "key", "rid": 0, "peer_mac": MAC_A, "peer_id": "a",
                                       "key": store.pair_key("a", "b", 2), "pw_id": 2, "age_s": 0,
                                       "older": [[1, store.pair_key("a", "b", 1), 0]]})]
    # A report of an older version just gets the newest, no push; a future one is refused.
    assert [t for t, _ in call(service, sb, {"t": "key_report", "rid": 5, "peer_mac": MAC_A, "pw_id": 1})] == ["reply"]
    assert reply(call(service, sb, {"t": "key_report", "rid": 6, "peer_mac": MAC_A, "pw_id": 9}))["code"] == "bad_request"


def test_key_messages_carry_the_older_versions_with_their_ages(env):
    """Issue 14 section 4: a restarted agent gets every version still live (at
    most what its key ring holds), each with its age, newest first."""
    service, store = env
    sa = bound(service, "a", MAC_A)
    bound(service, "b", MAC_B)
    reply(call(service, sa, {"t": "key_req", "rid": 2, "peer_mac": MAC_B}))  # version 1 at NOW
    for dt in (5, 10, 15):
        store.rotate_pair_key("a", "b", NOW + dt)
    answer = reply(service.handle(sa, {"t": "key_req", "rid": 3, "peer_mac": MAC_B}, NOW + 16))
    assert (answer["pw_id"], answer["age_s"]) == (4, 1)
    assert answer["older"] == [[3, store.pair_key("a", "b", 3), 6], [2, store.pair_key("a", "b", 2), 11]]
    # The push of a rotation carries the same, with ages counted from the new version.
    event = store.events_since(0)[-1]
    push = dict(service.on_event(event))[("push", "a")]
    assert (push["pw_id"], push["age_s"], [v[0::2] for v in push["older"]]) == (4, 0, [[3, 5], [2, 10]])
    # Retired versions are not offered.
    store.retire_old_versions(NOW + 12)
    again = reply(service.handle(sa, {"t": "key_req", "rid": 4, "peer_mac": MAC_B}, NOW + 16))
    assert [v[0] for v in again["older"]] == [3]


def test_multicast_request_and_rotation(env):
    service, store = env
    sa = bound(service, "a", MAC_A)
    assert reply(call(service, sa, {"t": "mcast_req", "rid": 2}))["pw_id"] == 1
    seq = store.last_event_seq()
    assert store.rotate_multicast_key(NOW + 1) == 2
    [(target, msg)] = [a for e in store.events_since(seq) for a in service.on_event(e)]
    assert target == ("broadcast", None) and msg["t"] == "multicast" and msg["pw_id"] == 2
    assert reply(call(service, sa, {"t": "mcast_req", "rid": 3}))["pw_id"] == 2
    assert reply(call(service, Session("c"), {"t": "mcast_req", "rid": 1}))["code"] == "not_bound"


def test_timers_rotate_once_and_retire_old_material(env):
    service, store = env
    store.get_or_create_pair_key("a", "b", NOW)
    service.rekey_after_s = service.multicast_rekey_after_s = 100
    service.retire_after_s = 50
    service.periodic(NOW + 50)
    assert store.pair_key("a", "b", 2) is None
    service.periodic(NOW + 101)
    service.periodic(NOW + 102)
    assert store.pair_key("a", "b", 2) is not None and store.pair_key("a", "b", 3) is None
    assert store.current_multicast_key()[1] == 2
    service.periodic(NOW + 160)                                    # version 1 superseded 59 s ago
    assert store.pair_key("a", "b", 1) is None and store.multicast_key(1) is None


def test_revocation_rotates_and_tells_everyone(env):
    service, store = env
    for host, mac in (("a", MAC_A), ("b", MAC_B), ("c", MAC_C)):
        bound(service, host, mac)
    store.get_or_create_pair_key("a", "c", NOW)
    store.get_or_create_pair_key("b", "c", NOW)
    store.get_or_create_pair_key("a", "b", NOW)
    seq = store.last_event_seq()
    assert revoke_and_rotate(store, "c", NOW + 1) == (True, 2)
    actions = [a for e in store.events_since(seq) for a in service.on_event(e)]
    kinds = [(t, m.get("t")) for t, m in actions]
    assert (("disconnect", "c"), None) in kinds
    assert (("broadcast", None), "peer_revoked") in kinds
    assert (("broadcast", None), "multicast") in kinds
    assert not any(t[0] == "push" for t, _ in actions)              # nothing new goes to or about c
    assert store.current_multicast_key()[1] == 2
    assert reply(call(service, Session("c", bound_mac=MAC_C), {"t": "ping", "rid": 1}))["code"] == "revoked"


def test_the_timers_run_at_a_tenth_of_the_shortest_interval_within_5_to_60_s(env):
    """A full read of the pairs every 5 s held up requests at 10,000 hosts; the
    defaults (rekey 3,600 s, retire 300 s) now run it every 30 s."""
    service, _ = env
    for rekey, multicast, retire, every in ((3600, 3600, 300, 30.0), (3600, 3600, 3600, 60.0),
                                            (1, 3600, 300, 5.0), (3600, 120, 300, 12.0)):
        service.rekey_after_s, service.multicast_rekey_after_s, service.retire_after_s = rekey, multicast, retire
        assert service.periodic_every_s == every, (rekey, multicast, retire)
