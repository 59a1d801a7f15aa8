"""The MQTT ACL table (`server.mqtt_acl`): what each identity may publish, subscribe to and
receive, as both brokers enforce it (mosquitto reads `mosquitto_acl()`, the embedded broker
calls `allowed`), and the topic matching it rests on."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.ids import ID_PATTERN, MAX_ID_LENGTH
from server.mqtt_acl import (
    COORDINATOR,
    MANAGER,
    RULES,
    SELF,
    Access,
    MosquittoTls,
    allowed,
    covers,
    matches,
    mosquitto_acl,
    nats_authorization,
    nats_permissions,
    nats_subject,
)
from server.pki import Identity, Kind, coordinator_replica_service, manager_replica_service
from server.topics import Topics

T = Topics("d", "c")
READ, WRITE = Access.READ, Access.WRITE
ids = st.from_regex(ID_PATTERN, fullmatch=True)


def replica_ids(service: str) -> st.SearchStrategy[str]:
    """Replica ids of `service` that a certificate can carry: `service:{service}-{id}` within
    the CN's 64 characters (a longer one is refused when its certificate is issued, so it
    never reaches the broker)."""
    room = MAX_ID_LENGTH - len(Identity(Kind.SERVICE, f"{service}-x").username) + 1
    return ids.filter(lambda r: len(r) <= room)


def can_publish(user: str, topic: str) -> bool:
    return allowed(user, WRITE, topic)


def can_receive(user: str, topic: str) -> bool:
    return allowed(user, READ, topic)


def can_subscribe(user: str, topic_filter: str) -> bool:
    return allowed(user, READ, topic_filter, subscribe=True)


def reports(t: Topics, pid: str) -> list[str]:
    return [t.proplet_create_for(pid), t.proplet_alive_for(pid), t.proplet_results_for(pid)]


def manager_says(t: Topics, pid: str) -> list[str]:
    return [t.task_start, t.task_start_for(pid), t.task_stop, t.task_stop_for(pid)]


@given(a=ids, b=ids)
def test_a_proplet_speaks_only_as_itself(a: str, b: str) -> None:
    for topic in reports(T, a):
        assert can_publish(a, topic)
        assert can_publish(b, topic) is (a == b)
    # Never what the manager or the coordinator says, in any namespace.
    for topic in [*manager_says(T, a), T.result_ack_for(a), T.round_next]:
        assert not can_publish(a, topic), topic


@given(a=ids, b=ids)
def test_a_proplet_reads_its_own_tasks_and_acks_and_the_broadcasts(a: str, b: str) -> None:
    for topic in [*manager_says(T, a), T.result_ack_for(a), T.round_next]:
        assert can_receive(a, topic) and can_subscribe(a, topic), topic
    for topic in [T.task_start_for(b), T.task_stop_for(b), T.result_ack_for(b)]:
        assert can_receive(a, topic) is (a == b)
    # Nobody else's reports, and no wildcard over other proplets' topics.
    for topic in reports(T, b):
        assert not can_receive(a, topic)
    for wide in (f"{T.task_start}/+", f"{T.base}/#", "#", f"{T.base}/control/manager/ack/+"):
        assert not can_subscribe(a, wide), wide


def test_only_the_manager_starts_and_stops_tasks_and_reads_every_report() -> None:
    for topic in [*manager_says(T, "p1"), T.result_ack_for("p1")]:
        assert can_publish(MANAGER, topic), topic
    for user in (COORDINATOR, "operator:admin", "service:registry", "p1", "p2"):
        for topic in [T.task_start, T.task_start_for("p2"), T.task_stop_for("p2")]:
            assert not can_publish(user, topic), (user, topic)
    for sub in T.reports:
        assert can_subscribe(MANAGER, sub)
        assert not can_subscribe(COORDINATOR, sub) and not can_subscribe("p1", sub)
    for topic in reports(T, "p1"):
        assert can_receive(MANAGER, topic)
        assert not can_publish(MANAGER, topic)  # the manager never speaks as a proplet


def test_only_the_coordinator_announces_round_completions() -> None:
    assert can_publish(COORDINATOR, T.round_next)
    for user in (MANAGER, "operator:admin", "p1", "service:aggregator"):
        assert not can_publish(user, T.round_next), user
        assert can_receive(user, T.round_next), user  # a broadcast: everyone may read it


def test_a_service_or_operators_own_topics_never_name_a_proplet() -> None:
    """The patterns apply to every identity (as in mosquitto): a service's "own" report topic
    ends in a user name with ':', which is not an id, so the manager drops it."""
    user = Identity(Kind.OPERATOR, "admin").username
    assert can_publish(user, f"{T.base}/control/proplet/create/{user}")
    assert T.parse_report(f"{T.base}/control/proplet/create/{user}") is None


@pytest.mark.parametrize("bad", ["a/b", "+", "#", "a+", "x#", "", "a\x00"])
def test_a_user_name_that_could_widen_a_pattern_gets_nothing_from_it(bad: str) -> None:
    for rule in RULES:
        if rule.user is None and SELF in rule.topic.split("/"):
            assert rule.filter_for(bad) is None
    assert not can_publish(bad, f"{T.base}/control/proplet/create/{bad}")


def test_topic_matching() -> None:
    assert matches("a/+/c", "a/b/c") and not matches("a/+/c", "a/b/c/d")
    assert matches("a/#", "a") and matches("a/#", "a/b/c") and not matches("a/#", "b")
    assert matches("a/b", "a/b") and not matches("a/b", "a/b/c") and not matches("a/b/c", "a/b")
    assert covers("a/+/c", "a/b/c") and covers("a/+/c", "a/+/c") and covers("a/#", "a/+/#")
    assert not covers("a/b", "a/+") and not covers("a/+", "a/#") and not covers("a/+", "a")


def test_the_mosquitto_file_is_the_table() -> None:
    text = mosquitto_acl()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    patterns = [r for r in RULES if r.user is None]
    assert lines[: len(patterns)] == [f"pattern {r.access.value} {r.topic}" for r in patterns]
    users = [line.removeprefix("user ") for line in lines if line.startswith("user ")]
    assert users == [MANAGER, COORDINATOR]
    topics = [line for line in lines if line.startswith("topic ")]
    assert topics == [f"topic {r.access.value} {r.topic}" for r in RULES if r.user is not None]
    # Every proplet, present and future, is covered by the patterns: adding one changes
    # nothing in this file.
    assert "%u" in text and "p1" not in text


def replica(replica_id: str) -> str:
    """A manager replica's user name (its certificate's CN)."""
    return Identity(Kind.SERVICE, manager_replica_service(replica_id)).username


@given(pid=ids, r=replica_ids("manager"))
def test_a_manager_replica_has_the_manager_s_rights_and_no_other(pid: str, r: str) -> None:
    """`service:manager-{id}` may do on the broker exactly what `service:manager` may (the
    manager's rights, nothing of a proplet's or the coordinator's beyond the patterns); a
    service whose name only starts like it ('managerX', 'manager-' with no id) may not."""
    user = replica(r)
    topics = [*reports(T, pid), *manager_says(T, pid), T.result_ack_for(pid), T.round_next]
    for topic in topics:
        assert can_publish(user, topic) is can_publish(MANAGER, topic), topic
        assert can_subscribe(user, topic) is can_subscribe(MANAGER, topic), topic
    assert can_publish(user, T.task_start_for(pid)) and can_subscribe(user, T.reports[0])
    assert not can_publish(user, T.proplet_results_for(pid))  # speaking as a proplet
    assert not can_publish(user, T.round_next)  # the coordinator's
    for impostor in ("service:managerx", "service:manager-", "operator:manager-1", "manager-1"):
        assert not can_publish(impostor, T.task_start_for(pid)), impostor
        assert not can_receive(impostor, T.proplet_results_for(pid)), impostor


def coordinator_replica(replica_id: str) -> str:
    """A coordinator replica's user name (its certificate's CN)."""
    return Identity(Kind.SERVICE, coordinator_replica_service(replica_id)).username


@given(pid=ids, r=replica_ids("coordinator"))
def test_a_coordinator_replica_has_the_coordinator_s_rights_and_no_other(pid: str, r: str) -> None:
    """`service:coordinator-{id}` may do on the broker exactly what `service:coordinator` may
    (announce rounds); nothing of the manager's; lookalikes get nothing of it."""
    user = coordinator_replica(r)
    topics = [*reports(T, pid), *manager_says(T, pid), T.result_ack_for(pid), T.round_next]
    for topic in topics:
        assert can_publish(user, topic) is can_publish(COORDINATOR, topic), topic
        assert can_subscribe(user, topic) is can_subscribe(COORDINATOR, topic), topic
    assert can_publish(user, T.round_next)
    assert not can_publish(user, T.task_start_for(pid))  # the manager's
    assert not can_publish(replica(r), T.round_next)  # and a manager replica is no coordinator
    for impostor in ("service:coordinatorx", "service:coordinator-", "operator:coordinator-1"):
        assert not can_publish(impostor, T.round_next), impostor


def test_the_mosquitto_file_names_each_manager_replica_with_the_manager_s_rights() -> None:
    text = mosquitto_acl(manager_replicas=["0", "1", "0"])
    blocks = [b.splitlines() for b in text.split("\n\n")[1:]]
    by_user = {b[0].removeprefix("user "): b[1:] for b in blocks}
    assert list(by_user) == [MANAGER, COORDINATOR, replica("0"), replica("1")]
    assert by_user[replica("0")] == by_user[replica("1")] == by_user[MANAGER]
    # Without replicas: the single manager's file, unchanged.
    assert mosquitto_acl(manager_replicas=[]) == mosquitto_acl()
    with pytest.raises(ValueError, match="service name"):
        mosquitto_acl(manager_replicas=["a/b"])


def test_the_mosquitto_file_names_each_coordinator_replica_with_the_coordinator_s_rights() -> None:
    text = mosquitto_acl(manager_replicas=["0"], coordinator_replicas=["a", "b", "a"])
    blocks = [b.splitlines() for b in text.split("\n\n")[1:]]
    by_user = {b[0].removeprefix("user "): b[1:] for b in blocks}
    assert list(by_user) == [
        MANAGER,
        COORDINATOR,
        replica("0"),
        coordinator_replica("a"),
        coordinator_replica("b"),
    ]
    assert by_user[coordinator_replica("a")] == by_user[COORDINATOR]
    assert by_user[coordinator_replica("b")] == by_user[COORDINATOR]
    assert mosquitto_acl(coordinator_replicas=[]) == mosquitto_acl()
    with pytest.raises(ValueError, match="service name"):
        mosquitto_acl(coordinator_replicas=["a+b"])


def test_the_mosquitto_listener_requires_a_certificate_and_names_every_file() -> None:
    block = MosquittoTls(ca="CA", cert="CERT", key="KEY", crl="CRL", acl="ACL").listener(8883)
    assert block.splitlines() == [
        "listener 8883",
        "cafile CA",
        "certfile CERT",
        "keyfile KEY",
        "crlfile CRL",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "allow_anonymous false",
        "acl_file ACL",
    ]


# --- The same table as NATS permissions (the clustered broker) -------------------------


def nats_allows(subjects: list[str], subject: str) -> bool:
    """NATS's rule: `*` is one token, `>` the rest (one or more), else tokens are equal."""
    for allowed_subject in subjects:
        a, s = allowed_subject.split("."), subject.split(".")
        for i, token in enumerate(a):
            if token == ">":
                if len(s) > i:
                    return True
                break
            if i >= len(s) or (token != "*" and token != s[i]):
                break
        else:
            if len(a) == len(s):
                return True
    return False


nats_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,20}", fullmatch=True)


@given(a=nats_ids, b=nats_ids)
def test_nats_permissions_are_the_table(a: str, b: str) -> None:
    """For a proplet, the manager and the coordinator, every topic of both proplets' and of
    the broadcasts: NATS allows the publish and the subscription exactly when the table
    does."""
    topics = [
        *reports(T, b),
        *manager_says(T, b),
        T.result_ack_for(b),
        *reports(T, a),
        *manager_says(T, a),
        T.result_ack_for(a),
        T.round_next,
        *T.reports,
    ]
    for user in (a, MANAGER, COORDINATOR, replica(b), coordinator_replica(b)):
        permissions = nats_permissions(user)
        publish = permissions["publish"]["allow"]  # type: ignore[index]
        subscribe = permissions["subscribe"]["allow"]  # type: ignore[index]
        for topic in topics:
            subject = nats_subject(topic)
            if "+" not in topic:
                assert nats_allows(publish, subject) is can_publish(user, topic), (user, topic)
            assert nats_allows(subscribe, subject) is can_subscribe(user, topic), (user, topic)


def test_the_nats_users_are_the_certificates_subjects() -> None:
    block = nats_authorization(["p1", MANAGER, "p1"])
    assert block.startswith("authorization ")
    users = json.loads(block.removeprefix("authorization "))["users"]
    assert [u["user"] for u in users] == ["CN=p1", f"CN={MANAGER}"]
    # Every identity reads its QoS 1 deliveries (an internal subject of NATS's MQTT listener).
    assert all(u["permissions"]["subscribe"]["allow"][0] == "$MQTT.sub.>" for u in users)
    # ... and is an MQTT user only: on the NATS protocol port that subject would show it all.
    assert all(u["allowed_connection_types"] == ["MQTT"] for u in users)


def test_an_id_nats_cannot_carry_is_refused_by_name() -> None:
    """'.' separates NATS tokens: an id with one cannot be a topic level on that broker."""
    with pytest.raises(ValueError, match=r"'p\.1' cannot be a NATS token"):
        nats_authorization(["p.1"])
