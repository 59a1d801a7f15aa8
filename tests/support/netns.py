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
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.processes import ChildProcess, started

NS_PREFIX = "pfl"
LINK_PREFIX = "pf"
_counter = itertools.count(1)
_NS_NAME = re.compile(rf"^{NS_PREFIX}([0-9a-f]+)n")
_LINK_NAME = re.compile(rf"^{LINK_PREFIX}([0-9a-f]+)x")
# One command of `ip`: milliseconds in practice; the bound only keeps a wedged one from
# hanging the suite.
IP_S = 20.0
# A relay process opening its tap (imports and one ioctl), and stopping.
READY_S = 30.0
STOP_S = 10.0
_FRAMES = re.compile(r"frames forwarded=(\d+) dropped=(\d+)")
# `python -m tests.support.lossy_link` runs from the checkout (the tests are not installed).
ROOT = Path(__file__).resolve().parents[2]


def ip(*args: str) -> str:
    """`ip ARGS`; its output. Fails with its stderr."""
    return _run("ip", *args)


def tc(*args: str) -> str:
    """`tc ARGS`; its output. Fails with its stderr."""
    return _run("tc", *args)


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=IP_S, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def _mac(*args: str) -> str:
    """The MAC address of the link `args` name (`NAME`, or `-n NAMESPACE NAME`)."""
    [link] = json.loads(ip("-j", *args[:-1], "link", "show", args[-1]))
    return str(link["address"])


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
    def impaired(
        self, host: Host, *, delay_ms: float, loss: float, logs: Path, seed: int = 0
    ) -> Iterator[Impairment]:
        """`host`'s link delays every IPv4 packet by `delay_ms` and loses each with
        probability `loss`, both ways, as `tc qdisc add ... netem delay D loss P` on both
        ends would; as it was again on the way out.

        This machine's kernel has no netem, so the kernel's tc hands the link's IPv4 frames
        to a process that holds and drops them (`tests.support.lossy_link`): gateway to host,
        frames arriving at the namespace's end are redirected (`mirred`) to a tap there,
        whose process writes them back to be received on the tap; host to gateway, frames
        arriving at this side's end go to a tap here, and what its process writes back is
        redirected into the bridge, where it would have arrived. ARP is left alone.

        Yields the `Impairment`: once it is over, `frames()` says what each direction's
        process forwarded and dropped."""
        i = self.hosts.index(host)
        tag = host.link.removesuffix(f"h{i}")
        outbound, inbound = f"{tag}o{i}", f"{tag}i{i}"
        ns = ("-n", host.name)
        argv = [sys.executable, "-m", "tests.support.lossy_link"]
        settings = [str(delay_ms), str(loss)]
        impairment = Impairment()
        with contextlib.ExitStack() as undo:
            # Host to gateway: the tap here answers to the bridge's MAC, so the frames its
            # process writes back are the bridge's to take.
            ip("tuntap", "add", "dev", outbound, "mode", "tap")
            undo.callback(_quietly, ip, "link", "del", outbound)
            ip("link", "set", outbound, "address", _mac(self.bridge), "up")
            relay = ChildProcess(
                f"link-{outbound}",
                [*argv, outbound, *settings, str(seed)],
                logs,
                cwd=ROOT,
                stdout="log",
            )
            impairment.relays.append(_ready(undo.enter_context(started(relay, grace=STOP_S))))
            tc("qdisc", "add", "dev", outbound, "ingress")
            tc(*_redirect(outbound), "ingress", "redirect", "dev", self.bridge)
            tc("qdisc", "add", "dev", host.link, "ingress")
            undo.callback(_quietly, tc, "qdisc", "del", "dev", host.link, "ingress")
            tc(*_redirect(host.link), "egress", "redirect", "dev", outbound)
            # Gateway to host: the tap in the namespace answers to its end's MAC, and takes
            # what it receives for the namespace: without the reverse-path check, which would
            # drop it (the way back to the gateway is the veth end, not the tap).
            ip(*ns, "tuntap", "add", "dev", inbound, "mode", "tap")
            undo.callback(_quietly, ip, *ns, "link", "del", inbound)
            ip(*ns, "link", "set", inbound, "address", _mac(*ns, host.inner), "up")
            for conf in ("all", inbound):
                path = f"/proc/sys/net/ipv4/conf/{conf}/rp_filter"
                _run(*self.run_in(host, ["sh", "-c", f"echo 0 > {path}"]))
            relay = ChildProcess(
                f"link-{inbound}",
                self.run_in(host, [*argv, inbound, *settings, str(seed + 1)]),
                logs,
                cwd=ROOT,
                stdout="log",
            )
            impairment.relays.append(_ready(undo.enter_context(started(relay, grace=STOP_S))))
            tc(*ns, "qdisc", "add", "dev", host.inner, "ingress")
            undo.callback(_quietly, tc, *ns, "qdisc", "del", "dev", host.inner, "ingress")
            tc(*ns, *_redirect(host.inner), "egress", "redirect", "dev", inbound)
            yield impairment


def _ready(relay: ChildProcess) -> ChildProcess:
    """The relay, once it has its tap open (fails if it exits, or after READY_S)."""
    end = time.monotonic() + READY_S
    while "ready" not in relay.log_text():
        assert relay.running, f"{relay.name} exited\n{relay.tail()}"
        assert time.monotonic() < end, f"{relay.name} not ready\n{relay.tail()}"
        time.sleep(0.02)
    return relay


@dataclass
class Impairment:
    """The processes that carry an impaired link's frames (host to gateway, gateway to host)."""

    relays: list[ChildProcess] = field(default_factory=list)

    def frames(self) -> list[tuple[int, int]]:
        """(forwarded, dropped) for each direction, as its process counted them; once the
        impairment is over (the processes print them when they stop)."""
        counts = []
        for relay in self.relays:
            found = _FRAMES.search(relay.log_text())
            assert found, f"{relay.name} counted nothing\n{relay.tail()}"
            counts.append((int(found.group(1)), int(found.group(2))))
        return counts


def _redirect(dev: str) -> list[str]:
    """The start of a filter on `dev`'s ingress that sends every IPv4 frame somewhere
    (`mirred` and where follow)."""
    every_ipv4_frame = ("parent", "ffff:", "protocol", "ip", "u32", "match", "u32", "0", "0")
    return ["filter", "add", "dev", dev, *every_ipv4_frame, "action", "mirred"]


def _quietly(run: Callable[..., str], *args: str) -> None:
    """Clean-up that may find the thing gone already (its namespace deleted first)."""
    with contextlib.suppress(RuntimeError):
        run(*args)


@contextlib.contextmanager
def network(hosts: int) -> Iterator[Network]:
    """A bridge on a free private /24 and `hosts` namespaces joined to it (see the module
    docstring); all of it removed on the way out, whatever happened."""
    if os.geteuid() != 0:
        raise PermissionError("network namespaces and links need root (docs/engineering.md, Tests)")
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
