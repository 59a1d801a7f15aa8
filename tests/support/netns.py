"""Hosts of the tests' own: network namespaces joined to this machine by a veth pair each, for
the faults between hosts (docs/reliability.md, "Faults between hosts").

`network(n)` makes, for one test: a bridge in this machine's namespace holding the gateway
address of a private /24 (10.x.y.0/24, chosen per network so that it overlaps no address or
route the machine has), and `n` namespaces, each joined to the bridge by a veth pair, with an
address on the subnet and its default route via the gateway. Services bind on the gateway
address (free ports, as on loopback); what runs in a namespace (`Network.run_in`) reaches
them there and nothing else. `cut(host)` takes the host-side end of its veth down (the
namespace's link has no carrier, the bridge no port: packets either way are lost) and
`restore(host)` brings it back. Everything is removed on exit, on failure too.

Names are unique per test run (this process's pid, a counter): namespaces `pfl{pid}n{k}-{i}`,
interfaces `pf{pid}x{k}...` (hex). What a run killed before its clean-up left behind is swept
the next time a network is made (the pid in the name no longer runs).

Needs root and iproute2 (`ip`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import random
import re
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

NS_PREFIX = "pfl"
LINK_PREFIX = "pf"
_counter = itertools.count(1)
_NS_NAME = re.compile(rf"^{NS_PREFIX}([0-9a-f]+)n")
_LINK_NAME = re.compile(rf"^{LINK_PREFIX}([0-9a-f]+)x")
# One command of `ip`: milliseconds in practice; the bound only keeps a wedged one from
# hanging the suite.
IP_S = 20.0


def ip(*args: str) -> str:
    """`ip ARGS`; its output. Fails with its stderr."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_S, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_leftovers() -> None:
    """Remove the namespaces and interfaces of test runs that no longer run."""
    for line in ip("netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        found = _NS_NAME.match(name)
        if found and not _pid_running(int(found.group(1), 16)):
            with contextlib.suppress(RuntimeError):
                ip("netns", "del", name)
    for link in json.loads(ip("-j", "link", "show") or "[]"):
        name = str(link.get("ifname", ""))
        found = _LINK_NAME.match(name)
        if found and not _pid_running(int(found.group(1), 16)):
            with contextlib.suppress(RuntimeError):
                ip("link", "del", name)


def _taken_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network this machine has an address in or a route to."""
    taken = []
    for entry in json.loads(ip("-j", "-4", "addr", "show") or "[]"):
        for a in entry.get("addr_info", []):
            taken.append(ipaddress.IPv4Network(f"{a['local']}/{a['prefixlen']}", strict=False))
    for route in json.loads(ip("-j", "-4", "route", "show", "table", "all") or "[]"):
        dst = str(route.get("dst", ""))
        if dst and dst != "default":
            with contextlib.suppress(ValueError):
                taken.append(ipaddress.IPv4Network(dst, strict=False))
    return taken


def free_subnet(rng: random.Random) -> ipaddress.IPv4Network:
    """A 10.x.y.0/24 that overlaps nothing this machine has."""
    taken = _taken_networks()
    for _ in range(1000):
        candidate = ipaddress.IPv4Network(f"10.{rng.randrange(256)}.{rng.randrange(256)}.0/24")
        if not any(candidate.overlaps(t) for t in taken):
            return candidate
    raise RuntimeError("no free 10.x.y.0/24 on this machine")


@dataclass(frozen=True)
class Host:
    """One namespace: its name, its address on the subnet, and the two ends of its veth pair
    (`link` on this machine's side, a port of the bridge; `inner` in the namespace)."""

    name: str
    address: str
    link: str
    inner: str


@dataclass
class Network:
    """The bridge (`bridge`, with the `gateway` address) and the hosts joined to it."""

    subnet: ipaddress.IPv4Network
    bridge: str
    gateway: str
    hosts: list[Host] = field(default_factory=list)

    def run_in(self, host: Host, argv: Sequence[str]) -> list[str]:
        """The command line that runs `argv` inside `host`'s namespace."""
        return ["ip", "netns", "exec", host.name, *argv]

    def cut(self, host: Host) -> None:
        """Take `host`'s link down: nothing passes between it and the rest."""
        ip("link", "set", host.link, "down")

    def restore(self, host: Host) -> None:
        ip("link", "set", host.link, "up")

    def link_up(self, host: Host) -> bool:
        [link] = json.loads(ip("-j", "link", "show", host.link))
        return "UP" in link.get("flags", [])


@contextlib.contextmanager
def network(hosts: int) -> Iterator[Network]:
    """A bridge on a free private /24 and `hosts` namespaces joined to it (see the module
    docstring); all of it removed on the way out, whatever happened."""
    sweep_leftovers()
    pid, k = os.getpid(), next(_counter)
    tag = f"{pid:x}x{k:x}"
    subnet = free_subnet(random.Random(f"{pid}-{k}-{os.urandom(4).hex()}"))
    addresses = [str(a) for a in itertools.islice(subnet.hosts(), hosts + 1)]
    net = Network(subnet, f"{LINK_PREFIX}{tag}b", addresses[0])
    made_links: list[str] = []
    made_namespaces: list[str] = []
    try:
        ip("link", "add", net.bridge, "type", "bridge")
        made_links.append(net.bridge)
        ip("addr", "add", f"{net.gateway}/{subnet.prefixlen}", "dev", net.bridge)
        ip("link", "set", net.bridge, "up")
        for i, address in enumerate(addresses[1:]):
            host = Host(
                f"{NS_PREFIX}{pid:x}n{k}-{i}",
                address,
                f"{LINK_PREFIX}{tag}h{i}",
                f"{LINK_PREFIX}{tag}p{i}",
            )
            ip("netns", "add", host.name)
            made_namespaces.append(host.name)
            ip("link", "add", host.link, "type", "veth", "peer", "name", host.inner)
            made_links.append(host.link)
            ip("link", "set", host.inner, "netns", host.name)
            ip("link", "set", host.link, "master", net.bridge)
            ip("link", "set", host.link, "up")
            ns = ("-n", host.name)
            ip(*ns, "link", "set", "lo", "up")
            ip(*ns, "addr", "add", f"{address}/{subnet.prefixlen}", "dev", host.inner)
            ip(*ns, "link", "set", host.inner, "up")
            ip(*ns, "route", "add", "default", "via", net.gateway)
            net.hosts.append(host)
        yield net
    finally:
        # A namespace's end of a veth goes with the namespace, and its peer with it.
        for name in reversed(made_namespaces):
            with contextlib.suppress(RuntimeError):
                ip("netns", "del", name)
        for name in reversed(made_links):
            with contextlib.suppress(RuntimeError):
                ip("link", "del", name)
