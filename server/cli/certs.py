"""`propeller-fl certs ...`: the deployment CA and its bundles (`server.pki`).

    certs init DIR [--service NAME[=HOST,...]]... [--operator NAME]... [--proplet ID]...
    certs issue DIR proplet ID | service NAME --host H... | operator NAME [--out D] [--replace]
    certs revoke DIR (KIND NAME | --serial HEX...)
    certs list DIR [--json]
    certs mqtt-acl [--manager-replica ID]... [--coordinator-replica ID]... [--out FILE]

`init` makes the CA in DIR (keeping one that is there) and issues the bundles it is given that
do not exist yet: what compose's one-shot certs job runs, idempotent across restarts. `issue`
writes one new bundle (DIR/<kind>-<name> unless --out) and touches nothing else; `revoke` adds
certificates to the CA's revocation list, which every service re-reads on its next call.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from server.cli.one_process import CommandFailed, one_line_failure
from server.cli.runner import add_command
from server.mqtt_acl import mosquitto_acl
from server.pki import (
    COORDINATOR_REPLICAS,
    MANAGER_REPLICAS,
    Bundle,
    CertificateAuthority,
    Identity,
    Kind,
    PkiError,
)

T = TypeVar("T")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    certs = sub.add_parser(
        "certs",
        help="the deployment CA: create it, issue and revoke certificates (mutual TLS)",
        description=(
            "Create a deployment CA, issue a certificate bundle (ca.crt, tls.crt, tls.key) per "
            "service, operator and proplet, revoke them. See docs/security.md."
        ),
    )
    actions = certs.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(
        name: str, run: Callable[[argparse.Namespace], Awaitable[int]], summary: str
    ) -> argparse.ArgumentParser:
        return add_command(actions, name, run, summary, command=f"certs {name}")

    init = action(
        "init", cmd_init, "create the CA in DIR (kept if there) and issue the bundles named"
    )
    init.add_argument("dir", type=Path, metavar="DIR")
    init.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="NAME[=HOST,...]",
        help="a service's bundle, with the hosts it is reached at (repeatable)",
    )
    init.add_argument("--operator", action="append", default=[], metavar="NAME")
    init.add_argument("--proplet", action="append", default=[], metavar="ID")

    issue = action("issue", cmd_issue, "issue one new bundle (touches nothing else)")
    issue.add_argument("dir", type=Path, metavar="DIR", help="the CA directory")
    issue.add_argument("kind", choices=[k.value for k in Kind])
    issue.add_argument("name", metavar="NAME", help="the proplet id, service or operator name")
    issue.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="HOST",
        help="(services) a host name or IP address it is reached at; repeatable",
    )
    issue.add_argument("--out", type=Path, default=None, metavar="DIR", help="bundle directory")
    issue.add_argument("--days", type=int, default=365, help="validity in days (365)")
    issue.add_argument(
        "--replace", action="store_true", help="overwrite a bundle already in its directory"
    )

    revoke = action(
        "revoke", cmd_revoke, "revoke an identity's certificates, or certificates by serial"
    )
    revoke.add_argument("dir", type=Path, metavar="DIR", help="the CA directory")
    revoke.add_argument("kind", nargs="?", choices=[k.value for k in Kind])
    revoke.add_argument("name", nargs="?", metavar="NAME")
    revoke.add_argument("--serial", action="append", default=[], metavar="HEX")

    acl = action(
        "mqtt-acl",
        cmd_mqtt_acl,
        "the broker's ACL as a mosquitto acl_file (docs/security.md, MQTT)",
    )
    acl.add_argument("--out", type=Path, default=None, metavar="FILE")
    acl.add_argument(
        "--manager-replica",
        action="append",
        default=[],
        metavar="ID",
        help="a manager replica's id: user service:manager-ID gets the manager's rights "
        "(its certificate: certs issue DIR service manager-ID); repeatable",
    )
    acl.add_argument(
        "--coordinator-replica",
        action="append",
        default=[],
        metavar="ID",
        help="a coordinator replica's id: user service:coordinator-ID gets the coordinator's "
        "rights (its certificate: certs issue DIR service coordinator-ID); repeatable",
    )

    listing = action("list", cmd_list, "the certificates issued, and which are revoked")
    listing.add_argument("dir", type=Path, metavar="DIR", help="the CA directory")
    listing.add_argument("--json", action="store_true")


def _identity(kind: str, name: str) -> Identity:
    try:
        return Identity.parse(kind, name)
    except ValueError as exc:
        raise CommandFailed(str(exc)) from None


def _service(spec: str) -> tuple[Identity, list[str]]:
    name, _, hosts = spec.partition("=")
    return _identity("service", name), [h for h in hosts.split(",") if h]


def _existing(directory: Path) -> CertificateAuthority:
    ca = CertificateAuthority(directory)
    if not ca.cert_path.exists():
        raise CommandFailed(f"{directory}: no CA here (propeller-fl certs init {directory})")
    return ca


async def _run(fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)` in a thread (file I/O, signing); its errors as the command's one line."""
    try:
        return await asyncio.to_thread(fn, *args)
    except (PkiError, ValueError) as exc:
        raise CommandFailed(str(exc)) from None


@one_line_failure("certs init")
async def cmd_init(args: argparse.Namespace) -> int:
    """Create the CA in DIR unless one is there, then issue each bundle named below that does not
    exist yet (so running it again changes nothing).
    """
    wanted: list[tuple[Identity, list[str]]] = [_service(s) for s in args.service]
    wanted += [(_identity("operator", n), []) for n in args.operator]
    wanted += [(_identity("proplet", n), []) for n in args.proplet]

    def init() -> list[str]:
        ca = CertificateAuthority(args.dir)
        lines = []
        if ca.exists():
            ca.certificate()
            lines.append(f"ca          {ca.dir} (kept)")
        else:
            ca = CertificateAuthority.create(args.dir)
            lines.append(f"ca          {ca.dir}")
        for identity, hosts in wanted:
            bundle = ca.bundle_for(identity)
            if bundle.cert.exists():
                lines.append(f"{identity.kind.value:<11} {bundle.dir} (kept)")
            else:
                ca.issue(identity, hosts=hosts)
                lines.append(f"{identity.kind.value:<11} {bundle.dir}")
        return lines

    for line in await _run(init):
        print(line)
    return 0


@one_line_failure("certs issue")
async def cmd_issue(args: argparse.Namespace) -> int:
    """Issue a new key and certificate for one identity, written as a bundle."""
    identity = _identity(args.kind, args.name)
    ca = _existing(args.dir)

    def issue() -> Bundle:
        return ca.issue(
            identity, hosts=args.host, out=args.out, days=args.days, replace=args.replace
        )

    bundle = await _run(issue)
    print(f"{identity.kind.value} {identity.name}: {bundle.dir}")
    return 0


@one_line_failure("certs revoke")
async def cmd_revoke(args: argparse.Namespace) -> int:
    """Add certificates to the CA's revocation list (crl.pem): every service refuses them from its
    next call on, without a restart.
    """
    ca = _existing(args.dir)
    if args.serial:
        if args.kind or args.name:
            raise CommandFailed("give KIND NAME or --serial, not both")
        try:
            serials = {int(s, 16) for s in args.serial}
        except ValueError:
            raise CommandFailed(f"--serial: {args.serial} are not hexadecimal") from None
        revoked = await _run(ca.revoke, serials)
    elif args.kind and args.name:
        revoked = await _run(ca.revoke_identity, _identity(args.kind, args.name))
    else:
        raise CommandFailed("give the identity to revoke (KIND NAME) or --serial HEX")
    new = sorted(revoked)
    print(f"revoked {len(new)}: {', '.join(f'{s:x}' for s in new) or '(already revoked)'}")
    return 0


@one_line_failure("certs mqtt-acl")
async def cmd_mqtt_acl(args: argparse.Namespace) -> int:
    """Print (or write to --out) the MQTT ACL as a mosquitto acl_file: who may publish and read
    which topics, the same rules as the embedded broker's. Identities are certificate CNs; one
    file for every proplet, so adding one changes nothing here; each manager and coordinator
    replica is named (mosquitto matches user names exactly).
    """
    for option, service, ids in (
        ("--manager-replica", MANAGER_REPLICAS, args.manager_replica),
        ("--coordinator-replica", COORDINATOR_REPLICAS, args.coordinator_replica),
    ):
        for replica_id in ids:
            try:
                Identity(Kind.SERVICE, service.replica_service(replica_id))
            except ValueError as exc:
                raise CommandFailed(f"{option}: {exc}") from None
    text = mosquitto_acl(
        manager_replicas=args.manager_replica, coordinator_replicas=args.coordinator_replica
    )
    if args.out is None:
        print(text, end="")
    else:
        try:
            await asyncio.to_thread(args.out.write_text, text)
        except OSError as exc:
            raise CommandFailed(f"--out: {args.out}: {exc.strerror or exc}") from None
        print(f"mqtt acl: {args.out}")
    return 0


@one_line_failure("certs list")
async def cmd_list(args: argparse.Namespace) -> int:
    ca = _existing(args.dir)

    def listing() -> list[dict[str, str]]:
        revoked = ca.revoked()
        now = datetime.datetime.now(datetime.UTC)
        rows = []
        for i in ca.issued():
            state = (
                "revoked" if i.serial in revoked else "expired" if i.not_after < now else "valid"
            )
            rows.append(
                {
                    "serial": f"{i.serial:x}",
                    "kind": i.identity.kind.value,
                    "name": i.identity.name,
                    "state": state,
                    "not_after": i.not_after.isoformat(timespec="seconds"),
                    "bundle": i.bundle,
                }
            )
        return rows

    rows = await _run(listing)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'kind':<9} {'name':<38} {'state':<8} {'not after':<26} serial")
    for r in rows:
        print(f"{r['kind']:<9} {r['name']:<38} {r['state']:<8} {r['not_after']:<26} {r['serial']}")
    return 0
