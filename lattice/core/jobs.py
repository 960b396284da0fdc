"""Train-job lifecycle, pure: specs, ids, states, who takes part, who merges.

Owns the job spec (`TrainSpec`: parsed and bounded from a plain dict, so the same
check runs on a spec typed by a user and one received from the network), the job id
(`compute_job_id`), the job and participant state machines, roster selection, the
reconciliation planner (`plan`: what this daemon should do about one job, given the
replicated view) and the merge decisions. Must not import trio, libp2p, sockets,
lattice.learn or read the clock: time is passed in as ``now``. The trio runner is
`lattice.net.jobs`; the wire and state formats are in proto/jobs.md.

Theory of operation
-------------------
A job lives in the replicated state (`lattice.core.state`):

- ``jobs/<job_id>`` is written by the submitter only: the spec, a nonce, ``state``
  (``submitted`` or ``cancelled``) and, once enough volunteers joined, the ``roster``.
  The job id is a hash of (kind, spec, submitter, nonce), so anyone can check that a
  record says what its id commits to.
- ``participation/<job_id>`` is written by each participant about itself: its
  participant state, progress, its final model's blob, and ``job_state`` claims
  (``running``, ``merging``, ``done``, ``failed``).

The job's status is the join (max in `STATUS_ORDER`) of the submitter's state and the
participants' claims (`lattice.core.state.views`), so it only moves forward and every
peer computes the same status from the same records.

Selection. Volunteers whose config accepts the task write ``state: joined``. The
submitter *seals* the roster: the first ``min_peers`` live joiners in a deterministic
order (SHA-256 of job id and peer id, so the same peers are not always first), stored
sorted by peer id in its own record. Only one author writes the roster, so there is
nothing to agree on: each participant reads it and takes its rank (index in the sorted
roster). A joiner left out withdraws (``state: left``). Computing the roster from the
joined entries on every peer instead would let two peers that have seen different
joiners start different jobs.

Merging. After its last step each participant publishes its final parameters as a
blob and claims ``merging``. The merger is the lowest-rank roster member that
published a final and is not known to be dead; it merges once every roster member
published a final or left, or when ``merge_timeout`` has passed since it finished
(missing members are recorded). If the merger dies, the next candidate takes over
``takeover`` seconds later per position (`merge_decision`).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from lattice.core.codec import canonical

__all__ = [
    "ALGORITHMS",
    "BUILTIN_TASKS",
    "CORRECTIONS",
    "ClaimFailed",
    "IllegalTransition",
    "JOB_TRANSITIONS",
    "JobSpecError",
    "KIND_TRAIN",
    "MergeDecision",
    "PARTICIPANT_TRANSITIONS",
    "Policy",
    "STATUS_ORDER",
    "TERMINAL",
    "TrainSpec",
    "Join",
    "SealRoster",
    "Start",
    "Stop",
    "Withdraw",
    "check_transition",
    "compute_job_id",
    "job_summary",
    "merge_decision",
    "new_job_record",
    "parse_train_spec",
    "plan",
    "rank_of",
    "read_job",
    "select_roster",
]

KIND_TRAIN = "train"
ALGORITHMS = ("gossip", "noloco", "none")
WEIGHTINGS = ("uniform", "samples", "data")
CORRECTIONS = ("none", "logit-adjust")
BUILTIN_TASKS = ("breast-cancer-logreg", "digits-mlp", "digits-softmax")
JOB_ID_HEX = 32  # 128 bits of SHA-256: collisions need 2^64 submissions
_ID_DOMAIN = b"lattice/job/1\x00"

# -- states -------------------------------------------------------------------------------

# Same order as lattice.core.state.views.STATUS_ORDER (a test keeps them equal).
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
never goes back."""

PARTICIPANT_TRANSITIONS: dict[str | None, frozenset[str]] = {
    None: frozenset({"joined", "running"}),  # running directly: resumed after a restart
    "joined": frozenset({"running", "left", "failed"}),
    "running": frozenset({"running", "merging", "left", "failed"}),
    "merging": frozenset({"merging", "done", "left", "failed"}),
    "done": frozenset(),
    "left": frozenset(),
    "failed": frozenset(),
}
"""One participant's own entry; ``running -> running`` is a progress update."""


class IllegalTransition(ValueError):
    """A state change the machine forbids: our own bug, never a peer's."""


def check_transition(table: Mapping[Any, frozenset[str]], old: str | None, new: str) -> None:
    if new not in table.get(old, frozenset()):
        raise IllegalTransition(f"{old!r} -> {new!r} is not a legal transition")


# -- the spec -----------------------------------------------------------------------------


class JobSpecError(ValueError):
    """A job spec that is malformed or out of bounds; ``field`` names the culprit."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._\-]{0,63}")
_OPTION_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_PARTITION_RE = re.compile(r"iid|dirichlet:([0-9.eE+\-]+)")
_SCHEDULE_RE = re.compile(r"constant|(late|tail)(?::([0-9.eE+\-]+))?")
_COMPRESSION_RE = re.compile(r"none|fp16|int8(?::([0-9]{1,9}))?|topk:([0-9.eE+\-]+)")


@dataclass(frozen=True)
class TrainSpec:
    """What every participant of a train job must agree on.

    Defaults equal `lattice.learn.JobSpec`'s (a test keeps them in step); `min_peers`
    is the number of participants. `merge_timeout` bounds how long the merger waits
    for the others' final models after finishing its own steps."""

    task: str
    min_peers: int = 4
    steps: int = 600
    batch: int = 32
    lr: float = 0.02
    momentum: float = 0.9
    sync_every: int = 2
    schedule: str = "late"
    algorithm: str = "gossip"
    partition: str = "iid"
    compression: str = "none"
    weighting: str = "data"
    correction: str = "none"
    outer_lr: float = 0.7
    outer_momentum: float = 0.3
    seed: int = 0
    norm_factor: float = 10.0
    merge_timeout: float = 60.0
    task_options: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Every field, explicitly: the form stored in the job record and hashed."""
        out = asdict(self)
        out["task_options"] = dict(self.task_options)
        return out


# field -> (kind, low, high, low inclusive?, high inclusive?)
_INTS: dict[str, tuple[int, int]] = {
    "min_peers": (1, 256),
    "steps": (1, 10_000_000),
    "batch": (1, 1 << 16),
    "sync_every": (1, 10_000_000),
    "seed": (0, (1 << 32) - 1),
}
_FLOATS: dict[str, tuple[float, float, bool]] = {  # (low, high, low exclusive?)
    "lr": (0.0, 100.0, True),
    "momentum": (0.0, 0.999999, False),
    "outer_lr": (0.0, 100.0, True),
    "outer_momentum": (0.0, 0.999999, False),
    "norm_factor": (1.0, 1e6, False),
    "merge_timeout": (1.0, 7 * 86400.0, False),
}
_STRS = ("task", "algorithm", "partition", "compression", "weighting", "schedule", "correction")
_KNOWN = set(_INTS) | set(_FLOATS) | set(_STRS) | {"task_options", "kind"}


def parse_train_spec(raw: Any) -> TrainSpec:
    """A `TrainSpec` from a plain mapping (user input or a received record).

    Unknown fields are refused (a typo must not silently fall back to a default).
    Raises JobSpecError. The checks are syntactic where the learning ring owns the
    meaning (the task must also exist and be allowed on each daemon; the partition and
    codec strings are parsed again by lattice.learn when the job starts)."""
    if not isinstance(raw, Mapping):
        raise JobSpecError("spec", f"must be a map, got {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in _KNOWN)
    if unknown:
        raise JobSpecError(unknown[0], "unknown field")
    if raw.get("kind", KIND_TRAIN) != KIND_TRAIN:
        raise JobSpecError("kind", f"only {KIND_TRAIN!r} jobs are supported")
    if "task" not in raw:
        raise JobSpecError("task", "is required")
    values: dict[str, Any] = {}
    for name, (lo, hi) in _INTS.items():
        if name in raw:
            v = raw[name]
            if type(v) is not int or not lo <= v <= hi:
                raise JobSpecError(name, f"must be an integer in [{lo}, {hi}]")
            values[name] = v
    for name, (lo, hi, open_low) in _FLOATS.items():
        if name in raw:
            v = raw[name]
            if type(v) not in (int, float) or not math.isfinite(v) or v > hi \
                    or v < lo or (open_low and v == lo):
                bracket = "(" if open_low else "["
                raise JobSpecError(name, f"must be a number in {bracket}{lo}, {hi}]")
            values[name] = float(v)
    for name in _STRS:
        if name in raw:
            v = raw[name]
            if not isinstance(v, str) or len(v) > 64:
                raise JobSpecError(name, "must be a string of at most 64 characters")
            values[name] = v
    spec = TrainSpec(**values, task_options=_parse_options(raw.get("task_options", {})))
    _check_strings(spec)
    if spec.sync_every > spec.steps:
        raise JobSpecError("sync_every", "must not exceed steps")
    return spec


def _parse_options(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, Mapping) or len(raw) > 16:
        raise JobSpecError("task_options", "must be a map of at most 16 options")
    out = {}
    for k, v in raw.items():
        if not isinstance(k, str) or not _OPTION_RE.fullmatch(k):
            raise JobSpecError("task_options", f"bad option name {str(k)[:64]!r}")
        if isinstance(v, float) and not math.isfinite(v):
            raise JobSpecError(f"task_options.{k}", "must be finite")
        if not isinstance(v, (bool, int, float, str)) or (isinstance(v, str) and len(v) > 256):
            raise JobSpecError(f"task_options.{k}", "must be a bool, number or short string")
        out[k] = v
    return out


def _check_strings(spec: TrainSpec) -> None:
    if not _NAME_RE.fullmatch(spec.task):
        raise JobSpecError("task", "must be a task name like 'digits-mlp'")
    if spec.algorithm not in ALGORITHMS:
        raise JobSpecError("algorithm", f"must be one of {', '.join(ALGORITHMS)}")
    if spec.weighting not in WEIGHTINGS:
        raise JobSpecError("weighting", f"must be one of {', '.join(WEIGHTINGS)}")
    if spec.correction not in CORRECTIONS:
        raise JobSpecError("correction", f"must be one of {', '.join(CORRECTIONS)}")
    m = _SCHEDULE_RE.fullmatch(spec.schedule)
    if m is None or (m.group(2) is not None and not (_positive(m.group(2)) and float(m.group(2)) <= 1)):
        raise JobSpecError("schedule", "must be constant, late[:POWER] or tail[:FRACTION] (0 < POWER, FRACTION <= 1)")
    m = _PARTITION_RE.fullmatch(spec.partition)
    if m is None or (m.group(1) is not None and not _positive(m.group(1))):
        raise JobSpecError("partition", "must be 'iid' or 'dirichlet:ALPHA' with ALPHA > 0")
    m = _COMPRESSION_RE.fullmatch(spec.compression)
    bad_chunk = m is not None and m.group(1) is not None and int(m.group(1)) < 1
    bad_ratio = m is not None and m.group(2) is not None and not (
        _positive(m.group(2)) and float(m.group(2)) <= 1)
    if m is None or bad_chunk or bad_ratio:
        raise JobSpecError("compression", "must be none, fp16, int8[:CHUNK] or topk:RATIO (0 < RATIO <= 1)")


def _positive(text: str) -> bool:
    try:
        x = float(text)
    except ValueError:
        return False
    return math.isfinite(x) and x > 0


# -- the job record -------------------------------------------------------------------------


def compute_job_id(spec: Mapping[str, Any], submitter: str, nonce: str) -> str:
    """Hex prefix of SHA-256 over the canonical (kind, spec, submitter, nonce)."""
    body = canonical({"kind": KIND_TRAIN, "spec": dict(spec), "submitter": submitter, "nonce": nonce})
    return hashlib.sha256(_ID_DOMAIN + body).hexdigest()[:JOB_ID_HEX]


def new_job_record(spec: TrainSpec, submitter: str, nonce: str, now: float) -> tuple[str, dict[str, Any]]:
    """(job id, the value to write at ``jobs/<job_id>``). ``nonce``: fresh random hex."""
    if not isinstance(nonce, str) or not 8 <= len(nonce) <= 64:
        raise ValueError("nonce must be 8..64 characters of fresh randomness")
    body = spec.to_dict()
    job_id = compute_job_id(body, submitter, nonce)
    return job_id, {
        "id": job_id,
        "kind": KIND_TRAIN,
        "submitter": submitter,
        "nonce": nonce,
        "spec": body,
        "state": "submitted",
        "created": float(now),
    }


def read_job(job_id: str, record: Any) -> TrainSpec:
    """The spec of a received job record, after checking the record is well formed and
    that ``job_id`` is the hash of what it says. Raises JobSpecError."""
    if not isinstance(record, Mapping):
        raise JobSpecError("record", "must be a map")
    if record.get("kind") != KIND_TRAIN:
        raise JobSpecError("kind", f"only {KIND_TRAIN!r} jobs are supported")
    submitter, nonce = record.get("submitter"), record.get("nonce")
    if not isinstance(submitter, str) or not isinstance(nonce, str):
        raise JobSpecError("record", "submitter and nonce must be strings")
    spec_raw = record.get("spec")
    spec = parse_train_spec(spec_raw)
    if not isinstance(spec_raw, Mapping) or compute_job_id(spec_raw, submitter, nonce) != job_id:
        raise JobSpecError("id", "does not match the hash of the record")
    roster = record.get("roster")
    if roster is not None and not _valid_roster(roster, spec.min_peers):
        raise JobSpecError("roster", "must be a sorted list of distinct peer ids, at most min_peers")
    return spec


def _valid_roster(roster: Any, min_peers: int) -> bool:
    return (isinstance(roster, list) and 1 <= len(roster) <= min_peers
            and all(isinstance(p, str) and 0 < len(p) <= 128 for p in roster)
            and roster == sorted(set(roster)))


# -- selection ------------------------------------------------------------------------------


def _order_key(job_id: str, peer: str) -> bytes:
    return hashlib.sha256(f"{job_id}\x00{peer}".encode()).digest()


def select_roster(job_id: str, spec: TrainSpec, participants: Mapping[str, Mapping[str, Any]],
                  alive: Callable[[str], bool] = lambda _peer: True) -> list[str] | None:
    """The roster to seal: the first ``min_peers`` live joiners in hash order, sorted by
    peer id; None until enough have joined."""
    joined = [p for p, e in participants.items() if e.get("state") == "joined" and alive(p)]
    if len(joined) < spec.min_peers:
        return None
    chosen = sorted(joined, key=lambda p: _order_key(job_id, p))[: spec.min_peers]
    return sorted(chosen)


def rank_of(roster: list[str], peer: str) -> int | None:
    return roster.index(peer) if peer in roster else None


# -- reconciliation -------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """This daemon's volunteering rules (daemon config ``[jobs]``)."""

    accept_tasks: frozenset[str] = frozenset(BUILTIN_TASKS)
    max_jobs: int = 1


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


def plan(me: str, job_id: str, view: Mapping[str, Any], spec: TrainSpec, *, policy: Policy,
         active: frozenset[str] | set[str], reserved: int,
         alive: Callable[[str], bool] = lambda _peer: True) -> list[Action]:
    """What this daemon should do about one job, from the merged view (`store.jobs()`).

    ``active``: job ids we are running now; ``reserved``: how many jobs we are running
    or have joined and wait for (capacity in use). Idempotent: applying the actions and
    calling again yields nothing new, so the runner may call it on every change."""
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
            chosen = select_roster(job_id, spec, participants, alive)
            if chosen is not None:
                actions.append(SealRoster(job_id, chosen))
        if (our_state is None and spec.task in policy.accept_tasks and reserved < policy.max_jobs
                and sum(1 for e in participants.values() if e.get("state") == "joined") < spec.min_peers):
            actions.append(Join(job_id))
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
        actions.append(Start(job_id, list(roster), rank, resume=our_state in ("running", "merging")))
    elif (our_state in ("left", "failed") and ours.get("job_state") != "failed"
          and all(participants.get(p, {}).get("state") in ("left", "failed")
                  and _final_of(participants.get(p, {})) is None for p in roster)):
        actions.append(ClaimFailed(job_id))
    return actions


# -- merging --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeDecision:
    """``merger``: who should merge now (None: wait); ``inputs``: roster members whose
    final model is published, in rank order; ``missing``: the others still expected."""

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
    inputs = [p for p in roster if _final_of(participants.get(p, {})) is not None]
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


def _final_of(entry: Mapping[str, Any]) -> Mapping[str, Any] | None:
    final = entry.get("final")
    if (isinstance(final, Mapping) and isinstance(final.get("blob"), str)
            and type(final.get("samples")) is int and final["samples"] >= 0):
        return final
    return None


# -- presentation ---------------------------------------------------------------------------


def job_summary(view: Mapping[str, Any]) -> dict[str, Any]:
    """A compact, JSON-friendly summary of one job view (for `jobs list` / `watch`)."""
    record = view.get("spec", {})
    spec = record.get("spec", {}) if isinstance(record.get("spec"), Mapping) else {}
    participants = view.get("participants", {})
    roster = record.get("roster") or []
    steps_total = int(spec.get("steps", 0)) * (len(roster) or int(spec.get("min_peers", 0)))
    losses = [e["loss"] for e in participants.values()
              if isinstance(e.get("loss"), (int, float)) and math.isfinite(e["loss"])]
    accs = [e["accuracy"] for e in participants.values()
            if isinstance(e.get("accuracy"), (int, float)) and math.isfinite(e["accuracy"])]
    models = sorted({e["model"] for e in participants.values() if isinstance(e.get("model"), str)})
    totals = view.get("totals", {})
    return {
        "id": view.get("id"),
        "status": view.get("status"),
        "task": spec.get("task"),
        "submitter": view.get("submitter"),
        "min_peers": spec.get("min_peers"),
        "roster": list(roster),
        "joined": sorted(p for p, e in participants.items() if e.get("state") == "joined"),
        "steps": totals.get("steps", 0),
        "steps_total": steps_total,
        "loss": sum(losses) / len(losses) if losses else None,
        "accuracy": sum(accs) / len(accs) if accs else None,
        "bytes_sent": totals.get("bytes_sent", 0),
        "bytes_received": totals.get("bytes_received", 0),
        "peers": {p: e.get("state") for p, e in participants.items()},
        "model": models[0] if models else None,
        "created": record.get("created"),
    }
