"""The checks a participant's update passes before the coordinator counts it, beyond the
round's own rules (`rounds.admit`, `rounds.check_provenance`, `rounds.validate_update`): its
`num_samples` within the participant's cap, its values' magnitude and its distance from the
base model (`bounds`), and its signature (`server.provenance`). Also what those checks leave
for the aggregation: `ClippedUpdates` scales clipped updates towards the base model.

`OpenRoundMembers` keeps an open round's participants and reported proplets as sets, so
admitting an update to a big round does not scan its tuples.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace

from server.coordinator import bounds as B
from server.coordinator import rounds as R
from server.coordinator.backend import ModelBackend
from server.coordinator.rounds import Round, Update
from server.coordinator.store import RoundUpdates, each_update, update_headers
from server.errors import FailedPrecondition, InvalidArgument, NotFound
from server.provenance import Claim, check_signature
from server.tensors import INLINE_BYTES, Spec, Tensors, nbytes_of, offload_if_big, sha256_of


@dataclass(frozen=True)
class UpdateChecks:
    """The poisoning bounds and the num_samples cap (with the data store behind a "dataset"
    cap) one coordinator applies to every update; `backend` gives the base model the
    distance is measured from."""

    backend: ModelBackend
    bounds: B.UpdateBounds
    samples_cap: B.NumSamplesCap
    datasets: B.DatasetSizes | None

    def __post_init__(self) -> None:
        if self.samples_cap.source == "dataset" and self.datasets is None:
            raise ValueError("num_samples_cap 'dataset' needs the data store (datasets)")

    async def check(self, rnd: Round, update: Update) -> Update:
        """`update` checked against `rnd` (its provenance, num_samples, content, bounds and
        signature): returns it with its tensors in the base model's order, its sha256,
        distance and clip scale; raises naming the field otherwise."""
        R.check_provenance(rnd, update)
        await self.check_num_samples(update)
        base = await self.backend.base_tensors(rnd.model_ref) if self.bounds.needs_base else None
        if nbytes_of(update.tensors) <= INLINE_BYTES:
            checked = self.check_content(rnd, update, base)
            sha = digest(rnd.specs, update.tensors)
        else:
            # Two passes over a big update at once, each in a thread of its own: its checks,
            # and the sha256 its signature covers.
            checked, sha = await asyncio.gather(
                asyncio.to_thread(self.check_content, rnd, update, base),
                asyncio.to_thread(digest, rnd.specs, update.tensors),
            )
        return check_update_signature(rnd, replace(checked, sha256=sha))

    async def check_num_samples(self, update: Update) -> None:
        """`num_samples` within the participant's cap (`bounds.NumSamplesCap`): refused,
        naming the cap, when above it (its weight is what its proplet signed, never
        re-weighted). A site's partial (`site`) is within the sum of its contributors' caps."""
        if update.num_samples <= 0:
            raise InvalidArgument(f"num_samples: {update.num_samples} must be > 0")
        cap = self.samples_cap
        if cap.source == "none":
            return
        if update.contributors:
            limits = await asyncio.gather(*(self._limit(p) for p in update.contributors))
            limit = sum(limit for limit, _what in limits)
            what = (
                f"the {limit} samples of site {update.proplet_id!r}'s "
                f"{len(update.contributors)} contributors (their caps summed, "
                f"num_samples_cap={cap})"
            )
        else:
            limit, what = await self._limit(update.proplet_id)
        if update.num_samples > limit:
            raise InvalidArgument(
                f"num_samples: {update.num_samples} exceeds {what}; update not counted"
            )

    async def _limit(self, proplet_id: str) -> tuple[int, str]:
        """Proplet `proplet_id`'s num_samples cap, and its words for a refusal."""
        cap = self.samples_cap
        if cap.source == "fixed":
            return cap.value, f"the coordinator's cap of {cap.value} (num_samples_cap)"
        assert self.datasets is not None
        try:
            limit = await self.datasets.size(proplet_id)
        except NotFound:
            raise FailedPrecondition(
                f"num_samples: proplet {proplet_id!r} has no dataset in the data "
                "store to cap num_samples by (num_samples_cap=dataset); update not counted"
            ) from None
        return limit, (
            f"the {limit} samples proplet {proplet_id!r} holds in the data store "
            "(num_samples_cap=dataset)"
        )

    def check_content(self, rnd: Round, update: Update, base: Tensors | None) -> Update:
        """The update's content (`rounds.validate_update`), its values' magnitude and its
        distance from the base model; returns it with its tensors in the base model's order,
        its distance and clip scale. Runs off the event loop for big updates."""
        update = R.validate_update(rnd, update)
        B.check_magnitude(update.tensors, self.bounds.max_abs_value, "tensors")
        dist, scale = 0.0, 1.0
        if base is not None:
            bound = self.bounds.max_distance
            dist = B.distance(update.tensors, base)
            if dist > bound and not self.bounds.clip:
                raise InvalidArgument(
                    f"tensors: the update is {dist:.6g} from the base model (L2 norm of the "
                    f"difference over all tensors), beyond the coordinator's bound {bound:g} "
                    "(max_update_distance); update not counted"
                )
            scale = B.clip_scale(dist, bound)
        return replace(update, distance=dist, clip_scale=scale)


def check_update_signature(rnd: Round, update: Update) -> Update:
    """Over mutual TLS (the call's certificate is known): the update's signature over its
    claim, with the round's base model and the sha256 of the bytes received."""
    if update.certificate:
        claim = Claim.of(
            update,
            round_id=rnd.round_id,
            base_model_sha256=rnd.base_model_sha256,
            update_sha256=update.sha256,
        )
        check_signature(update.certificate, update.signature, claim)
    return update


def digest(specs: Sequence[Spec], tensors: Tensors) -> str:
    """The sha256 of an update's bytes in the base model's tensor order ("" when it lacks a
    tensor: its checks refuse it)."""
    if any(s.name not in tensors for s in specs):
        return ""
    return sha256_of({s.name: tensors[s.name] for s in specs})


class _Members:
    """A round's participants and reported proplets as sets, kept in step with its record:
    `reported` only ever grows by appending, so usually one proplet is added."""

    def __init__(self, participants: tuple[str, ...]) -> None:
        self.participants = participants
        self.participant_set = frozenset(participants)
        self.reported: tuple[str, ...] = ()
        self.reported_set: set[str] = set()

    def sync(self, reported: tuple[str, ...]) -> None:
        if reported is self.reported:
            return
        n = len(self.reported)
        if len(reported) == n + 1 and reported[:n] == self.reported:
            self.reported_set.add(reported[n])
        else:
            self.reported_set = set(reported)
        self.reported = reported


class OpenRoundMembers:
    """`rounds.admit` with an open round's members as sets (a big round's tuples are long;
    rounds in any other state answer from the record itself)."""

    def __init__(self) -> None:
        self._members: dict[str, _Members] = {}

    def admit(self, rnd: Round, proplet_id: str) -> bool:
        """True when `proplet_id` already reported in `rnd` (a repeat); raises when it may not
        report at all (`rounds.admit`)."""
        if rnd.state is not R.RoundState.OPEN:
            self.forget(rnd.round_id)
            return R.admit(rnd, proplet_id)
        members = self._members.get(rnd.round_id)
        if members is None or members.participants is not rnd.participants:
            members = self._members[rnd.round_id] = _Members(rnd.participants)
        members.sync(rnd.reported)
        return R.admit(
            rnd, proplet_id, participants=members.participant_set, reported=members.reported_set
        )

    def forget(self, round_id: str) -> None:
        """The round closed: no more updates to look up."""
        self._members.pop(round_id, None)


class ClippedUpdates:
    """A round's updates as they are aggregated: each one that clipping scaled
    (`Update.clip_scale` < 1) is `bounds.scaled` towards the base model; the others as sent.
    Iterated afresh by every aggregation attempt."""

    def __init__(self, updates: RoundUpdates, base: Tensors) -> None:
        self.updates = updates
        self.base = base

    @property
    def headers(self) -> Sequence[Update]:
        return update_headers(self.updates)

    async def __aiter__(self) -> AsyncIterator[Update]:
        async for u in each_update(self.updates):
            if u.clip_scale != 1.0:
                tensors = await offload_if_big(
                    nbytes_of(u.tensors), B.scaled, u.tensors, self.base, u.clip_scale
                )
                u = replace(u, tensors=tensors)
            yield u
            del u
