"""Who may publish and read what on the broker: one table (`RULES`), from which both the
mosquitto ACL file (`mosquitto_acl()`) and the embedded broker's topic check (`allowed`) are
derived, so the two brokers enforce the same rules.

A client's user name is its certificate's CN (`server.pki.Identity.username`): the proplet id
for a proplet, `service:NAME` / `operator:NAME` otherwise; the brokers also make it the MQTT
client id, so a session belongs to one identity. The rules, in every namespace (`m/+/c/+`):

- every identity (a mosquitto `pattern`; `%u` is its user name): publish its own
  announcement, heartbeat and task results (`control/proplet/{create,alive,results}/%u`);
  read its own task starts, stops and result acknowledgements
  (`control/manager/{start,stop,ack}/%u`), the broadcast starts and stops
  (`control/manager/{start,stop}`) and the round completions (`fl/rounds/next`). For a
  service or an operator these own topics carry a user name with ':' in its last level, never
  a proplet id, and the manager drops them: in effect they are a proplet's rights.
- `service:manager`: read every proplet's reports; publish task starts and stops (addressed
  and broadcast) and result acknowledgements. Only the manager starts or stops tasks. Every
  manager replica (`service:manager-{replica_id}`, `server.pki.ReplicatedService`) has
  the same rights: `allowed` and `nats_authorization` know them by name; mosquitto's user
  blocks name users exactly (a `pattern` substitutes `%u` / `%c` into a topic, it cannot
  select users), so `mosquitto_acl(manager_replicas=...)` writes a block per replica id.
- `service:coordinator`: publish round completions. Only the coordinator does. Every
  coordinator replica (`service:coordinator-{replica_id}`) has the same rights, written as
  the manager's replicas' (`mosquitto_acl(coordinator_replicas=...)`).
- nothing else: operators and the other services have no other MQTT rights (they use gRPC).

Pure (no I/O): matching follows MQTT's topic filters, and a subscription is allowed only when
one readable filter covers all of it (mosquitto grants any subscription and filters what it
delivers: the messages a client receives are the same on both brokers).

A clustered NATS broker (JetStream with its MQTT listener) gets the same table as NATS
permissions (`nats_authorization`): NATS maps a client certificate to a user by its subject
(`verify_and_map`) and has no per-user pattern like `%u` in a configuration file, so every
identity is a user of its own, its `SELF` rules written out with its name.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from dataclasses import dataclass

from server.pki import (
    COORDINATOR_REPLICAS,
    MANAGER_REPLICAS,
    REPLICATED,
    Identity,
    Kind,
    ReplicatedService,
)
from server.topics import (
    PROPLET_ALIVE,
    PROPLET_CREATE,
    PROPLET_RESULTS,
    RESULT_ACK,
    ROUND_NEXT,
    TASK_START,
    TASK_STOP,
)

# Rules hold in every deployment namespace: the CA, not the namespace, makes a deployment.
ANY_NAMESPACE = "m/+/c/+"
# In a pattern rule: the user name of the client the rule is applied to (mosquitto's `%u`).
SELF = "%u"

MANAGER = Identity(Kind.SERVICE, "manager").username
COORDINATOR = Identity(Kind.SERVICE, "coordinator").username


class Access(enum.Enum):
    READ = "read"  # subscribe and receive
    WRITE = "write"  # publish


@dataclass(frozen=True)
class Rule:
    """`user` (None: every identity, with `SELF` in `topic` standing for its user name) may
    `access` the topics `topic` (a filter under the namespace) matches."""

    user: str | None
    access: Access
    topic: str

    def filter_for(self, username: str) -> str | None:
        """The rule's topic filter for `username`, or None when the rule is not for it (or
        `username` could not stand as one topic level)."""
        if self.user is not None:
            mine = self.user == username or _replica_of(self.user, username)
            return self.topic if mine else None
        if SELF not in self.topic.split("/"):
            return self.topic
        if not username or any(c in username for c in "/+#\x00"):
            return None  # as mosquitto: no substitution that would widen the filter
        return "/".join(username if level == SELF else level for level in self.topic.split("/"))


def _service(username: str) -> Identity | None:
    """The service identity whose user name is `username` (None: not a service's)."""
    kind, sep, name = username.partition(":")
    if not sep or kind != Kind.SERVICE.value:
        return None
    try:
        return Identity(Kind.SERVICE, name)
    except ValueError:
        return None


def _replica_of(rule_user: str, username: str) -> bool:
    """Whether `username` is a replica's of the replicated service whose user name is
    `rule_user` (`service:manager-{id}` of `service:manager`)."""
    service, user = _service(rule_user), _service(username)
    if service is None or user is None:
        return False
    replicated = REPLICATED.get(service.name)
    return replicated is not None and replicated.replica_id(user) is not None


def _rules(user: str | None, access: Access, *topics: str) -> list[Rule]:
    return [Rule(user, access, f"{ANY_NAMESPACE}/{t}") for t in topics]


RULES: tuple[Rule, ...] = (
    *_rules(
        None,
        Access.WRITE,
        f"{PROPLET_CREATE}/{SELF}",
        f"{PROPLET_ALIVE}/{SELF}",
        f"{PROPLET_RESULTS}/{SELF}",
    ),
    *_rules(
        None,
        Access.READ,
        TASK_START,
        f"{TASK_START}/{SELF}",
        TASK_STOP,
        f"{TASK_STOP}/{SELF}",
        f"{RESULT_ACK}/{SELF}",
        ROUND_NEXT,
    ),
    *_rules(
        MANAGER, Access.READ, f"{PROPLET_CREATE}/+", f"{PROPLET_ALIVE}/+", f"{PROPLET_RESULTS}/+"
    ),
    *_rules(
        MANAGER,
        Access.WRITE,
        TASK_START,
        f"{TASK_START}/+",
        TASK_STOP,
        f"{TASK_STOP}/+",
        f"{RESULT_ACK}/+",
    ),
    *_rules(COORDINATOR, Access.WRITE, ROUND_NEXT),
)


def matches(topic_filter: str, topic: str) -> bool:
    """Whether `topic` (no wildcards) is one `topic_filter` matches."""
    f, t = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


def covers(topic_filter: str, requested: str) -> bool:
    """Whether every topic `requested` (a filter) matches, `topic_filter` matches too."""
    f, r = topic_filter.split("/"), requested.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(r) or r[i] == "#":
            return False
        if level != "+" and (r[i] == "+" or level != r[i]):
            return False
    return len(f) == len(r)


def allowed(
    username: str,
    access: Access,
    topic: str,
    *,
    subscribe: bool = False,
    rules: Iterable[Rule] = RULES,
) -> bool:
    """Whether `username` may publish to (`WRITE`) or receive from (`READ`) `topic`; with
    `subscribe`, whether it may subscribe to the filter `topic` (read all of it)."""
    for rule in rules:
        if rule.access is not access:
            continue
        granted = rule.filter_for(username)
        if granted is None:
            continue
        if covers(granted, topic) if subscribe else matches(granted, topic):
            return True
    return False


def mosquitto_acl(
    rules: Iterable[Rule] = RULES,
    *,
    manager_replicas: Iterable[str] = (),
    coordinator_replicas: Iterable[str] = (),
) -> str:
    """The rules as a mosquitto `acl_file`: `pattern` lines for every identity, then a `user`
    block per named user, and one per manager replica in `manager_replicas` and coordinator
    replica in `coordinator_replicas` (replica ids: user `service:manager-{id}` /
    `service:coordinator-{id}`, the service's rights). ValueError for a replica id that
    cannot name a certificate."""
    rules = list(rules)
    replicas = [
        *_replica_users(MANAGER_REPLICAS, manager_replicas),
        *_replica_users(COORDINATOR_REPLICAS, coordinator_replicas),
    ]
    lines = [
        "# propeller-fl MQTT ACL, generated from server/mqtt_acl.py (RULES); do not edit.",
        "# User names are certificate CNs (use_identity_as_username). Patterns apply to every",
        "# user, %u being its user name; mosquitto warns about the patterns without %u (the",
        "# broadcasts everyone reads): expected.",
    ]
    lines += [f"pattern {r.access.value} {r.topic}" for r in rules if r.user is None]
    users = dict.fromkeys(r.user for r in rules if r.user is not None)
    for user in users:
        lines += ["", f"user {user}"]
        lines += [f"topic {r.access.value} {r.topic}" for r in rules if r.user == user]
    for replica, service in replicas:
        lines += ["", f"user {replica}"]
        lines += [f"topic {r.access.value} {r.topic}" for r in rules if r.user == service]
    return "\n".join(lines) + "\n"


def _replica_users(service: ReplicatedService, replica_ids: Iterable[str]) -> list[tuple[str, str]]:
    """(replica's user name, the service's user name) for each of `replica_ids`, once."""
    own = Identity(Kind.SERVICE, service.name).username
    return [
        (Identity(Kind.SERVICE, service.replica_service(r)).username, own)
        for r in dict.fromkeys(replica_ids)
    ]


@dataclass(frozen=True)
class MosquittoTls:
    """Where a mosquitto TLS listener finds its files: the CA, its own certificate and key,
    the CA's revocation list and the ACL file (`mosquitto_acl()` written out)."""

    ca: str
    cert: str
    key: str
    crl: str
    acl: str

    def listener(self, port: int, bind: str = "") -> str:
        """A mosquitto.conf listener block (with `per_listener_settings true` at the top of
        the file): TLS, every client with a certificate of the CA and not revoked, its CN
        as user name and client id, the ACL; no anonymous access."""
        return "\n".join(
            [
                f"listener {port}{' ' + bind if bind else ''}",
                f"cafile {self.ca}",
                f"certfile {self.cert}",
                f"keyfile {self.key}",
                f"crlfile {self.crl}",
                "require_certificate true",
                "use_identity_as_username true",
                "use_username_as_clientid true",
                "allow_anonymous false",
                f"acl_file {self.acl}",
            ]
        )


# What NATS's MQTT listener delivers each QoS 1 subscription's messages on (an internal subject
# per subscription, with a random name): every identity must be allowed to read it, or its
# QoS 1 subscriptions fail.
NATS_MQTT_DELIVERY = "$MQTT.sub.>"


def nats_user(username: str) -> str:
    """The NATS user a certificate with CN `username` is mapped to (`verify_and_map`: the
    certificate's subject, RFC 2253)."""
    return f"CN={username}"


def nats_subject(topic_filter: str) -> str:
    """An MQTT topic filter as the NATS subject its MQTT listener uses: levels become tokens,
    `+` is `*` and `#` is `>`. ValueError for a level NATS cannot carry (a '.', the token
    separator, or a space)."""
    tokens = []
    for level in topic_filter.split("/"):
        if not level or any(c in level for c in ". \t"):
            raise ValueError(f"mqtt topic {topic_filter!r}: level {level!r} cannot be a NATS token")
        tokens.append(">" if level == "#" else "*" if level == "+" else level)
    return ".".join(tokens)


def nats_permissions(username: str, rules: Iterable[Rule] = RULES) -> dict[str, object]:
    """`username`'s rights as a NATS user's `permissions` (publish and subscribe allow
    lists; whatever is not allowed is denied)."""
    rules = list(rules)

    def allowed_subjects(access: Access) -> list[str]:
        granted = (r.filter_for(username) for r in rules if r.access is access)
        return [nats_subject(f) for f in granted if f is not None]

    return {
        "publish": {"allow": allowed_subjects(Access.WRITE)},
        "subscribe": {"allow": [NATS_MQTT_DELIVERY, *allowed_subjects(Access.READ)]},
    }


def nats_authorization(usernames: Iterable[str], rules: Iterable[Rule] = RULES) -> str:
    """A nats-server `authorization` block (JSON, which its configuration format reads) with
    a user per identity in `usernames` (certificate CNs) and its rights from `rules`, each
    allowed MQTT connections only: on the NATS protocol port a certificate holder could
    otherwise read `NATS_MQTT_DELIVERY`, where every subscriber's QoS 1 messages pass.
    ValueError for a user name that cannot be a NATS token (a proplet id with a '.')."""
    rules = list(rules)
    users = [
        {
            "user": nats_user(name),
            "permissions": nats_permissions(name, rules),
            "allowed_connection_types": ["MQTT"],
        }
        for name in dict.fromkeys(usernames)
    ]
    return "authorization " + json.dumps({"users": users}, indent=2) + "\n"
