"""`propeller-fl models verify N`: check the chain that made version N, from v0 up, using only
what the model registry stores and the deployment CA.

For every version on the chain (vN, the base its lineage names, that one's base, ... down to
v0) it checks:
- the version's bytes hash to its sha256 (v0, the root, is checked for that alone);
- it has a lineage (a version not produced by a round has none: the chain is broken there),
  naming a base version older than itself (its parent, named twice: the base model's uri and
  parent_version) whose sha256 is the one the lineage says it trained from, and its own
  sha256;
- every contributing update: it is for the lineage's round and base model, came from the
  round's pinned module (when it pinned one), its bytes hash to its sha256, its certificate
  was issued by the deployment CA to the proplet it names, and its signature verifies over
  `server.provenance.Claim` (round, proplet, base sha256, module digest, update sha256,
  num_samples, metrics, and the fuel its training consumed when the header carries it);
- the version equals what its lineage's strategy (with its recorded parameters) makes of its
  updates, recomputed here in the same order with the aggregator's own strategy objects
  (`server.aggregator.strategies`, bit for bit), each clipped update scaled as the coordinator
  did (`server.coordinator.bounds.scaled`), and each update's recorded weight is the one the
  strategy gives it;
- for a stateful strategy: the state the round started from (kept in the lineage) is the
  state the lineage of the version it names says its round left, and the state this round
  left hashes to what its own lineage says.

The FedAvg family holds one update at a time; the order-statistic rules hold the round's
updates, as the aggregator does. The answer lists every version with what was found; the
command fails naming the first broken link from v0 up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
from cryptography import x509

from propeller.v1 import model_registry_pb2
from server.aggregator.strategies import choose_strategy
from server.cli.client import Client
from server.cli.lineage import lineage_header
from server.coordinator.bounds import scaled
from server.errors import InvalidArgument, NotFound, PropellerError, RemoteError
from server.models import model_uri, parse_model_uri
from server.provenance import Claim, certificate_problem, signature_verifies
from server.registry.lineage import LineageBytes
from server.tensors import Tensors, offload_if_big, sha256_of, specs_from_proto, split_payload


@dataclass(frozen=True)
class Link:
    """One version of the chain and what its check found ("" = nothing wrong)."""

    version: int
    base: int | None
    round_id: str
    updates: int
    sha256: str
    problem: str = ""

    def to_dict(self) -> dict[str, object]:
        return {
            "version": self.version,
            "model_uri": model_uri(self.version),
            "base_version": self.base,
            "round_id": self.round_id,
            "updates": self.updates,
            "sha256": self.sha256,
            "ok": not self.problem,
            "problem": self.problem,
        }


class _Broken(Exception):
    """A version's check failed; the message says what."""


async def verify_chain(
    client: Client, version: int, ca: x509.Certificate | None, *, allow_unsigned: bool
) -> list[Link]:
    """Every version from v0 to `version` along its lineage, oldest first, each with what its
    check found. A version whose lineage cannot be read ends the walk (it is the oldest
    listed after v0 then, and broken)."""
    if version < 0:
        raise InvalidArgument(f"VERSION: {version} must be >= 0")
    links: list[Link] = []
    current = version
    while True:
        link = await _check_version(client, current, ca, allow_unsigned)
        links.append(link)
        if link.base is None:  # v0, or a version whose lineage says nothing of its base
            break
        current = link.base
    links.reverse()
    return links


async def _check_version(
    client: Client, version: int, ca: x509.Certificate | None, allow_unsigned: bool
) -> Link:
    try:
        header, _ = await client.get_model(version)
    except PropellerError as exc:
        return Link(version, None, "", 0, "", f"cannot read the version: {exc}")
    sha = header.sha256
    if version == 0:
        return Link(0, None, "", 0, sha)
    try:
        lineage, base, updates = await _check_lineage(client, version, sha, ca, allow_unsigned)
    except _Broken as exc:
        return Link(version, None, "", 0, sha, str(exc))
    except _BrokenAt as exc:
        return Link(version, exc.base, exc.round_id, exc.updates, sha, exc.problem)
    return Link(version, base, lineage.round_id, updates, sha)


class _BrokenAt(Exception):
    """A version whose lineage was read (so its base is known) but does not hold."""

    def __init__(self, base: int, round_id: str, updates: int, problem: str) -> None:
        super().__init__(problem)
        self.base = base
        self.round_id = round_id
        self.updates = updates
        self.problem = problem


async def _check_lineage(
    client: Client, version: int, sha: str, ca: x509.Certificate | None, allow_unsigned: bool
) -> tuple[model_registry_pb2.Lineage, int, int]:
    stream = client.lineage(version)
    try:
        first = await anext(stream, None)
    except PropellerError as exc:
        if isinstance(exc, NotFound) or (
            isinstance(exc, RemoteError) and exc.code == grpc.StatusCode.NOT_FOUND
        ):
            raise _Broken("no lineage: not produced by a round (stored by an operator?)") from None
        raise _Broken(f"cannot read its lineage: {exc}") from None
    if first is None or first.WhichOneof("part") != "header":
        raise _Broken("its lineage stream has no header")
    lineage = first.header
    try:
        base = parse_model_uri(lineage.base_model_uri, "base_model_uri")
    except PropellerError as exc:
        raise _Broken(f"lineage: {exc}") from None
    n = len(lineage.contributions)

    def broken(problem: str) -> _BrokenAt:
        return _BrokenAt(base, lineage.round_id, n, problem)

    if base >= version:
        raise _Broken(f"lineage names base v{base}, not an earlier version")
    if lineage.version != version:
        raise broken(f"its lineage is v{lineage.version}'s")
    if lineage.model_sha256 != sha:
        raise broken(f"its lineage names sha256 {lineage.model_sha256}, the version has {sha}")
    if lineage.parent_version != base:
        raise broken(f"its lineage names parent v{lineage.parent_version}, its base is v{base}")
    try:
        base_info = await client.model_info(base)
    except PropellerError as exc:
        raise broken(f"cannot read its base v{base}: {exc}") from None
    if base_info.sha256 != lineage.base_model_sha256:
        raise broken(
            f"trained from base v{base} with sha256 {lineage.base_model_sha256}, but v{base} "
            f"has {base_info.sha256}"
        )
    if not n:
        raise broken("its lineage lists no updates")
    try:
        choice = choose_strategy(lineage.strategy, lineage.strategy_params_json, "strategy")
    except PropellerError as exc:
        raise broken(f"its lineage names a strategy this tool cannot run: {exc}") from None
    strategy = choice.start()
    shown = "FedAvg" if choice.name == "fedavg" else choice.name
    base_tensors: Tensors | None = None
    data = LineageBytes(stream)
    try:
        for i, c in enumerate(lineage.contributions):
            field = f"contributions[{i}]"
            update = await data.take(i, c)
            tensors = split_payload(update, specs_from_proto(c.header.tensors, field), field)
            del update
            problem = _contribution_problem(lineage, c, tensors, ca, allow_unsigned)
            if problem:
                raise broken(f"update {i + 1} of {n} (proplet {c.header.proplet_id!r}): {problem}")
            if c.clip_scale != 1.0:
                if base_tensors is None:
                    _, base_tensors = await client.get_model(base)
                tensors = scaled(tensors, base_tensors, c.clip_scale)
            nbytes = sum(a.nbytes for a in tensors.values())
            await offload_if_big(nbytes, strategy.add, tensors, c.header.num_samples)
        state = await _start_state(client, lineage, choice.cls.stateful, data, broken)
        await data.end()
        if choice.cls.needs_base and base_tensors is None:
            _, base_tensors = await client.get_model(base)
        await strategy.prepare(base_tensors if choice.cls.needs_base else None, state)
        size = sum(s.nbytes for s in strategy.specs or ()) * max(1, strategy.count)
        result, new_state = await offload_if_big(
            size, strategy.result, base_tensors if choice.cls.needs_base else None, state
        )
    except PropellerError as exc:
        raise broken(f"its updates cannot be read or aggregated: {exc}") from None
    recomputed = await offload_if_big(sum(a.nbytes for a in result.values()), sha256_of, result)
    if recomputed != sha:
        raise broken(
            f"the stored version is not the {shown} of its {n} updates (stored sha256 {sha}, "
            f"recomputed {recomputed})"
        )
    if new_state is not None and sha256_of(new_state) != lineage.state.result_sha256:
        raise broken(
            f"its lineage says the round left {choice.name} state sha256 "
            f"{lineage.state.result_sha256 or '(none)'}, recomputed {sha256_of(new_state)}"
        )
    recorded = [c.weight for c in lineage.contributions]
    if recorded != strategy.weights():
        raise broken(
            f"its lineage records the updates' weights {recorded}, {choice.name} gives "
            f"{strategy.weights()}"
        )
    return lineage, base, n


async def _start_state(
    client: Client,
    lineage: model_registry_pb2.Lineage,
    stateful: bool,
    data: LineageBytes,
    broken: Callable[[str], _BrokenAt],
) -> Tensors | None:
    """The state a stateful strategy's round started from, read after the updates' bytes and
    linked to the state the round of the version it names left (None: zeros)."""
    if not stateful:
        if lineage.HasField("state"):
            raise broken(f"its lineage records a state, but {lineage.strategy} keeps none")
        return None
    record = lineage.state
    if not lineage.HasField("state") or not record.result_sha256:
        raise broken(f"its lineage does not record the {lineage.strategy} state")
    raw = await data.take_state(record)
    if not record.HasField("from_version"):
        if raw is not None:
            raise broken("its lineage lists a start state but no version that left it")
        return None
    if raw is None:
        raise broken(f"its lineage names state from v{record.from_version} but lists no state")
    if not 0 < record.from_version < lineage.version:
        raise broken(f"its state comes from v{record.from_version}, not an earlier round's version")
    state = split_payload(raw, specs_from_proto(record.tensors, "state.tensors"), "state")
    if sha256_of(state) != record.sha256:
        raise broken(f"its start state's bytes do not hash to {record.sha256}")
    try:
        left = await lineage_header(client, record.from_version)
    except PropellerError as exc:
        raise broken(f"cannot read the lineage of v{record.from_version}: {exc}") from None
    if left is None or left.state.result_sha256 != record.sha256:
        raise broken(
            f"it started from a {lineage.strategy} state (sha256 {record.sha256[:12]}...) that "
            f"v{record.from_version}'s round did not leave"
        )
    return state


def _contribution_problem(
    lineage: model_registry_pb2.Lineage,
    c: model_registry_pb2.Contribution,
    tensors: Tensors,
    ca: x509.Certificate | None,
    allow_unsigned: bool,
) -> str:
    h = c.header
    if h.round_id != lineage.round_id:
        return f"it is for round {h.round_id!r}, the version's round is {lineage.round_id!r}"
    if h.base_model_uri != lineage.base_model_uri:
        return f"it trained {h.base_model_uri}, the round {lineage.base_model_uri}"
    if h.base_model_sha256 not in ("", lineage.base_model_sha256):
        return f"it names base sha256 {h.base_model_sha256}, the round's is different"
    if lineage.module_digest and h.module_digest != lineage.module_digest:
        return f"module {h.module_digest or '(none)'}, the round pinned {lineage.module_digest}"
    sha = sha256_of(tensors)
    if sha != c.sha256:
        return f"its stored bytes hash to {sha}, its lineage says {c.sha256}"
    if not c.certificate and allow_unsigned:
        return ""
    if ca is None:
        return "no CA to check its certificate against (--ca)"
    cert, problem = certificate_problem(c.certificate, ca, h.proplet_id)
    if problem or cert is None:
        return problem
    claim = Claim.of(
        h,
        round_id=lineage.round_id,
        base_model_sha256=lineage.base_model_sha256,
        update_sha256=sha,
    )
    try:
        ok = signature_verifies(cert, h.signature, claim)
    except InvalidArgument as exc:
        return f"its header cannot be signed: {exc}"
    if not ok:
        return "its signature does not verify (its bytes or header changed after signing)"
    return ""
