"""The lifecycle every job kind shares, pure: ids, records, states and their transition
tables, who takes part, what this daemon should do next, who merges.

Must not import trio, libp2p, sockets, lattice.learn or read the clock: time is passed
in as ``now``. The theory of operation is in the package docstring (`lattice.core.jobs`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from lattice.core.codec import canonical
from lattice.core.jobs.access import check_access, eligible, may_volunteer, normalize_access
from lattice.core.jobs.attach import KIND_ATTACH, parse_attach_spec
from lattice.core.jobs.merge import KIND_MERGE, parse_merge_spec
from lattice.core.jobs.spec import JobSpecError
from lattice.core.jobs.train import KIND_TRAIN, parse_train_spec

JOB_ID_HEX = 32  # 128 bits of SHA-256: collisions need 2^64 submissions
_ID_DOMAIN = b"lattice/job/1\x00"


class JobSpecLike(Protocol):
    """What the lifecycle needs of any kind's spec."""

    @property
    def min_peers(self) -> int: ...

    @property
    def max_peers(self) -> int: ...

    @property
    def merge_timeout(self) -> float: ...

    def to_dict(self) -> dict[str, Any]: ...


SpecParser = Callable[[Any], JobSpecLike]
DEFAULT_PARSERS: Mapping[str, SpecParser] = {KIND_TRAIN: parse_train_spec,
                                             KIND_ATTACH: parse_attach_spec,
                                             KIND_MERGE: parse_merge_spec}

# -- states -------------------------------------------------------------------------------

STATUS_ORDER = ("submitted", "running", "merging", "failed", "cancelled", "done")
TERMINAL = frozenset({"done", "failed", "cancelled"})

JOB_TRANSITIONS: dict[str, frozenset[str]] = {
    "submitted": frozenset({"running", "failed", "cancelled"}),
    "running": frozenset({"merging", "failed", "cancelled"}),
    "merging": frozenset({"done", "failed", "cancelled"}),
    "done": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}
"""The job's life. Every edge goes up in STATUS_ORDER except merging -> failed and
running/merging -> failed, which the join tolerates: a status that is the max of claims
never goes back. Enforced where a daemon writes its own claims and the submitter its
record (`lattice.jobs`)."""

PARTICIPANT_TRANSITIONS: dict[str | None, frozenset[str]] = {
    None: frozenset({"joined", "running"}),  # running directly: resumed after a restart
    "joined": frozenset({"joined", "running", "left", "failed"}),
    "running": frozenset({"running", "paused", "merging", "left", "failed"}),
    # the volunteer's governor stopped our compute: partners skip us, we go on after
    "paused": frozenset({"paused", "running", "merging", "left", "failed"}),
    "merging": frozenset({"merging", "done", "left", "failed"}),
    "done": frozenset({"done"}),
    "left": frozenset({"left"}),
    "failed": frozenset({"failed"}),
}
"""One participant's own entry; ``X -> X`` is a progress update or a repeated claim."""


class IllegalTransition(ValueError):
    """A state change the machine forbids: our own bug, never a peer's."""


def check_transition(table: Mapping[Any, frozenset[str]], old: str | None, new: str) -> None:
    if new not in table.get(old, frozenset()):
        raise IllegalTransition(f"{old!r} -> {new!r} is not a legal transition")


# -- the job record -------------------------------------------------------------------------


def compute_job_id(spec: Mapping[str, Any], submitter: str, nonce: str,
                   kind: str = KIND_TRAIN) -> str:
    """Hex prefix of SHA-256 over the canonical (kind, spec, submitter, nonce)."""
    body = canonical({"kind": kind, "spec": dict(spec), "submitter": submitter, "nonce": nonce})
    return hashlib.sha256(_ID_DOMAIN + body).hexdigest()[:JOB_ID_HEX]


def new_job_record(spec: JobSpecLike, submitter: str, nonce: str, now: float,
                   kind: str = KIND_TRAIN, *, access: Mapping[str, Any] | None = None
                   ) -> tuple[str, dict[str, Any]]:
    """(job id, the value to write at ``jobs/<job_id>``). ``nonce``: fresh random hex;
    ``access``: who may take part (`lattice.core.jobs.access`; None: anyone)."""
    if not isinstance(nonce, str) or not 8 <= len(nonce) <= 64:
        raise ValueError("nonce must be 8..64 characters of fresh randomness")
    body = spec.to_dict()
    job_id = compute_job_id(body, submitter, nonce, kind)
    record = {
        "id": job_id,
        "kind": kind,
        "submitter": submitter,
        "nonce": nonce,
        "spec": body,
        "state": "submitted",
        "created": float(now),
    }
    if access:
        record["access"] = normalize_access(access)
    return job_id, record


def verify_record(job_id: str, record: Any) -> None:
    """Raise JobSpecError unless ``record`` is a well-formed job record (of any kind)
    whose id commits to it: ``job_id`` is the hash of its kind, spec, submitter and
    nonce, so only its submitter can have written it under this id. This is what the
    views check before they show a job (proto/jobs.md, "Authority")."""
    if not isinstance(record, Mapping):
        raise JobSpecError("record", "must be a map")
    kind, submitter, nonce = record.get("kind"), record.get("submitter"), record.get("nonce")
    spec_raw = record.get("spec")
    if not (isinstance(kind, str) and isinstance(submitter, str) and isinstance(nonce, str)
            and isinstance(spec_raw, Mapping)):
        raise JobSpecError("record", "kind, submitter and nonce must be strings, spec a map")
    if compute_job_id(spec_raw, submitter, nonce, kind) != job_id:
        raise JobSpecError("id", "does not match the hash of the record")
    roster = record.get("roster")
    if roster is not None and not _valid_roster(roster, MAX_ROSTER):
        raise JobSpecError("roster", "must be a sorted list of distinct peer ids")
    if "access" in record:
        check_access(record["access"])


MAX_ROSTER = 256
"""No kind seals more participants than this (a train job: ``min_peers`` <= 256)."""


def read_job(job_id: str, record: Any,
             parsers: Mapping[str, SpecParser] = DEFAULT_PARSERS) -> JobSpecLike:
    """The spec of a received job record, after checking the record is well formed,
    of a kind we know (``parsers``: kind -> its spec parser), and that ``job_id`` is the
    hash of what it says (`verify_record`). Raises JobSpecError."""
    verify_record(job_id, record)
    kind = record["kind"]
    parse = parsers.get(kind)
    if parse is None:
        raise JobSpecError("kind", f"unknown job kind {kind[:32]!r}; "
                           f"known: {', '.join(sorted(parsers))}")
    spec = parse(record["spec"])
    roster = record.get("roster")
    if roster is not None and not _valid_roster(roster, spec.max_peers):
        raise JobSpecError("roster", "must be a sorted list of distinct peer ids, at most "
                           "max_peers")
    return spec


def _valid_roster(roster: Any, max_peers: int) -> bool:
    return (isinstance(roster, list) and 1 <= len(roster) <= max_peers
            and all(isinstance(p, str) and 0 < len(p) <= 128 for p in roster)
            and roster == sorted(set(roster)))


# -- selection ------------------------------------------------------------------------------


def _order_key(job_id: str, peer: str) -> bytes:
    return hashlib.sha256(f"{job_id}\x00{peer}".encode()).digest()


def join_window(spec: JobSpecLike) -> float:
    """Seconds the roster stays open for more than ``min_peers`` joiners: a kind's spec
    may declare ``join_window`` (merge: gather volunteers); others seal at once."""
    return float(getattr(spec, "join_window", 0.0))


def select_roster(job_id: str, spec: JobSpecLike, participants: Mapping[str, Mapping[str, Any]],
                  alive: Callable[[str], bool] = lambda _peer: True,
                  eligible: Callable[[str, Mapping[str, Any]], bool] = lambda _p, _e: True, *,
                  open_for: float = math.inf) -> list[str] | None:
    """The roster to seal: the first ``max_peers`` live, eligible (the job's access)
    joiners in hash order, sorted by peer id; None until ``min_peers`` have joined and,
    while fewer than ``max_peers`` have, until the job has been open (``open_for``
    seconds) for its `join_window`."""
    joined = [p for p, e in participants.items()
              if e.get("state") == "joined" and alive(p) and eligible(p, e)]
    if len(joined) < spec.min_peers:
        return None
    if len(joined) < spec.max_peers and open_for < join_window(spec):
        return None
    chosen = sorted(joined, key=lambda p: _order_key(job_id, p))[: spec.max_peers]
    return sorted(chosen)


def rank_of(roster: list[str], peer: str) -> int | None:
    return roster.index(peer) if peer in roster else None


# -- reconciliation -------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """This daemon's capacity for jobs (daemon config ``[jobs]``)."""

    max_jobs: int = 1
    join_timeout: float = 600.0
    """A job we joined whose roster is not sealed within this many seconds is left
    (reason ``not_sealed``): anyone may submit a job and never seal it, which would
    hold our slot forever."""


@dataclass(frozen=True)
class SealRoster:
    job_id: str
    roster: list[str]


@dataclass(frozen=True)
class Join:
    job_id: str


@dataclass(frozen=True)
class Start:
    job_id: str
    roster: list[str]
    rank: int
    resume: bool  # our entry shows we were running before (a restart)


@dataclass(frozen=True)
class Withdraw:
    job_id: str
    reason: str


@dataclass(frozen=True)
class Stop:
    job_id: str
    reason: str


@dataclass(frozen=True)
class ClaimFailed:
    """Every roster member left or failed without a final model: nobody can finish the
    job, so a member says so (each one does: the claim is idempotent)."""

    job_id: str


Action = SealRoster | Join | Start | Withdraw | Stop | ClaimFailed

_OUR_FINISHED = ("done", "left", "failed")


def plan(me: str, job_id: str, view: Mapping[str, Any], spec: JobSpecLike, *, volunteer: bool,
         policy: Policy, active: frozenset[str] | set[str], reserved: int,
         alive: Callable[[str], bool] = lambda _peer: True,
         token: str | None = None, now: float | None = None) -> list[Action]:
    """What this daemon should do about one job, from the merged view (`store.jobs()`).

    ``volunteer``: the job's kind says this daemon takes part if there is room (its
    config accepts the job, or a local user asked to join it); ``active``: job ids we
    are running now; ``reserved``: how many jobs we are running or have joined and wait
    for (capacity in use); ``alive``: whether a peer has a live member record (only
    those are sealed); ``token``: the job's token when we submitted it
    (`lattice.core.jobs.access`), to check joiners' proofs; ``now``: the wall clock of
    the records, against our entries' ``updated`` for ``policy.join_timeout`` and the
    record's ``created`` for a kind's join window (None: never give up, the window is
    over). Idempotent: applying the actions and calling again yields nothing new, so
    the runner may call it on every change."""
    status = view.get("status", "submitted")
    record = view.get("spec", {})
    participants = view.get("participants", {})
    ours = participants.get(me, {})
    our_state = ours.get("state")
    roster = record.get("roster")
    actions: list[Action] = []
    if job_id in active:
        if status in ("cancelled", "failed"):
            actions.append(Stop(job_id, status))
        return actions
    if status in TERMINAL:
        if our_state == "joined":
            actions.append(Withdraw(job_id, status))
        return actions
    if roster is None:
        if view.get("submitter") == me and record.get("state") == "submitted":
            created = record.get("created")
            open_for = (now - created if now is not None and type(created) in (int, float)
                        else math.inf)
            chosen = select_roster(job_id, spec, participants, alive,
                                   eligible(job_id, record, token), open_for=open_for)
            if chosen is not None:
                actions.append(SealRoster(job_id, chosen))
        joined = sum(1 for e in participants.values() if e.get("state") == "joined")
        if our_state is None and volunteer and reserved < policy.max_jobs \
                and may_volunteer(record, me) and joined < spec.max_peers:
            actions.append(Join(job_id))
        elif (our_state == "joined" and now is not None and view.get("submitter") != me
              and type(ours.get("updated")) in (int, float)
              and now - ours["updated"] > policy.join_timeout):
            actions.append(Withdraw(job_id, "not_sealed"))
        return actions
    rank = rank_of(roster, me)
    if rank is None:
        if our_state == "joined":
            actions.append(Withdraw(job_id, "not_selected"))
        return actions
    if our_state is None:
        # a roster we never volunteered for (a submitter cannot draft us): ignore it
        return actions
    if our_state not in _OUR_FINISHED:
        actions.append(Start(job_id, list(roster), rank,
                             resume=our_state in ("running", "paused", "merging")))
    elif (our_state in ("left", "failed") and ours.get("job_state") != "failed"
          and all(participants.get(p, {}).get("state") in ("left", "failed")
                  and final_of(participants.get(p, {})) is None for p in roster)):
        actions.append(ClaimFailed(job_id))
    return actions


# -- merging --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeDecision:
    """``merger``: who should merge now (None: wait); ``inputs``: roster members whose
    final contribution is published, in rank order; ``missing``: the others still
    expected."""

    merger: str | None
    inputs: list[str]
    missing: list[str]
    complete: bool


def merge_decision(roster: list[str], participants: Mapping[str, Mapping[str, Any]], *,
                   me: str, now: float, deadline: float, takeover: float,
                   dead: frozenset[str] | set[str] = frozenset()) -> MergeDecision:
    """Who merges, deterministically from the same records.

    Candidates are the members with a published final that are not in ``dead``, in
    rank order. The first merges once the inputs are complete or ``deadline`` passed;
    candidate k takes over at ``deadline + k * takeover`` if no model appeared (the
    caller only asks while the job is not done). ``merger`` is None while nobody
    should merge yet; the caller merges when it is itself."""
    inputs = [p for p in roster if final_of(participants.get(p, {})) is not None]
    gone = [p for p in roster if participants.get(p, {}).get("state") in ("left", "failed")]
    missing = [p for p in roster if p not in inputs]
    # a member known dead without a final will not publish one: no need to wait for it
    complete = all(p in inputs or p in gone or p in dead for p in roster)
    candidates = [p for p in inputs if p not in dead]
    merger = None
    if candidates and (complete or now >= deadline):
        merger = candidates[0]  # whom we expect to merge (informational unless it is us)
        if me in candidates[1:] and now >= deadline + candidates.index(me) * takeover:
            merger = me  # no model appeared in time: we take over
    return MergeDecision(merger, inputs, missing, complete)


def final_of(entry: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """A participant's published final contribution ``{"blob", "samples"}``, if valid."""
    final = entry.get("final")
    if (isinstance(final, Mapping) and isinstance(final.get("blob"), str)
            and type(final.get("samples")) is int and final["samples"] >= 0):
        return final
    return None


# -- presentation ---------------------------------------------------------------------------


def job_summary(view: Mapping[str, Any]) -> dict[str, Any]:
    """A compact, JSON-friendly summary of one job view (for `jobs list` / `watch`):
    a view the state believes (`lattice.core.state.views`), so its spec parses."""
    record = view.get("spec", {})
    spec = record.get("spec", {}) if isinstance(record.get("spec"), Mapping) else {}
    participants = view.get("participants", {})
    roster = record.get("roster") or []
    # the views check who wrote the record, not a kind's spec: read its numbers with care
    steps_total = _count(spec.get("steps")) * (len(roster) or _count(spec.get("min_peers")))
    if record.get("kind") == KIND_MERGE:  # a merge's progress counts the output's tensors
        steps_total = _count(spec.get("tensors"))
    # only the roster speaks for the job: anyone may write an entry claiming a loss
    members = {p: e for p, e in participants.items() if p in roster}
    losses = [e["loss"] for e in members.values()
              if type(e.get("loss")) in (int, float) and math.isfinite(e["loss"])]
    accs = [e["accuracy"] for e in members.values()
            if type(e.get("accuracy")) in (int, float) and math.isfinite(e["accuracy"])]
    # why a failed job failed: a roster member's reason (each says it when it gives up)
    reasons = sorted((p, e["reason"]) for p, e in members.items()
                     if e.get("state") == "failed" and isinstance(e.get("reason"), str))
    totals = view.get("totals", {})
    return {
        "id": view.get("id"),
        "status": view.get("status"),
        "kind": record.get("kind", KIND_TRAIN),
        "task": spec.get("task") or spec.get("name") or None,  # an attach job's name
        "submitter": view.get("submitter"),
        "min_peers": _count(spec.get("min_peers")) or None,
        "roster": list(roster),
        "joined": sorted(p for p, e in participants.items() if e.get("state") == "joined"),
        "steps": totals.get("steps", 0),
        "steps_total": steps_total,
        "loss": sum(losses) / len(losses) if losses else None,
        "accuracy": sum(accs) / len(accs) if accs else None,
        "bytes_sent": totals.get("bytes_sent", 0),
        "bytes_received": totals.get("bytes_received", 0),
        "peers": {p: e.get("state") for p, e in participants.items()},
        "model": view.get("model"),  # the merged model the views verified
        "reason": reasons[0][1] if view.get("status") == "failed" and reasons else None,
        "created": record.get("created"),
    }


def _count(value: Any) -> int:
    return value if type(value) is int and 0 <= value < 2**53 else 0
