"""What an author may write into its own document, and local changes to it.

Owns the record schema of the shared state: which roots exist, which keys an author may
hold, the ownership rules (a member writes only its own member record, a submitter its
own job specs, a participant its own participation entries, a producer its own model
records) and the bounds of every value. Must not import trio, libp2p, pycrdt or read
the clock: it works on plain Python values so the same rules check a received document
and a local change before it is written.

An author's *content* is ``{root: {key: value}}`` for the roots in `ROOTS`:

========================  =====================================================
``member/<field>``        the author's own member record, one key per field
``jobs/<job_id>``         job specs the author submitted (``submitter == author``)
``participation/<job>``   the author's participation and progress in a job
``models/<model_id>``     model records the author produced (``producer == author``)
``counters/<name>``       the author's counters (non-negative ints), summed in views
========================  =====================================================
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, NoReturn

from lattice.core.state.limits import MAX_KEY_CHARS, MAX_SEQ, MAX_VALUE_DEPTH

ROOT_MEMBER = "member"
ROOT_JOBS = "jobs"
ROOT_PARTICIPATION = "participation"
ROOT_MODELS = "models"
ROOT_COUNTERS = "counters"
ROOTS = (ROOT_MEMBER, ROOT_JOBS, ROOT_PARTICIPATION, ROOT_MODELS, ROOT_COUNTERS)

MEMBER_FIELDS = frozenset(
    {"peer_id", "name", "version", "reachability", "addrs", "capabilities", "heartbeat",
     "started"})
CAPABILITY_FIELDS = frozenset({"cpus", "tasks", "memory_mb"})

# Job lifecycle (DESIGN.md, Jobs). The submitter's spec may only say submitted or
# cancelled (cancel is the submitter's alone); participants claim the rest.
SPEC_STATES = ("submitted", "cancelled")
PARTICIPANT_STATES = ("joined", "running", "paused", "merging", "done", "failed", "left")
CLAIMABLE_JOB_STATES = ("running", "merging", "done", "failed")
SUMMED_FIELDS = ("samples", "steps", "bytes_sent", "bytes_received")

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,%d}" % (MAX_KEY_CHARS - 1))


class OutOfBounds(ValueError):
    """Content an author is not allowed to hold. ``reason`` is the statistics key."""

    reason = "out_of_bounds"


def empty_content() -> dict[str, dict[str, Any]]:
    return {root: {} for root in ROOTS}


def is_record_id(key: Any) -> bool:
    return isinstance(key, str) and _ID_RE.fullmatch(key) is not None


# -- value checks -----------------------------------------------------------------------

def _fail(where: str, why: str) -> NoReturn:
    raise OutOfBounds(f"{where}: {why}")


def _check_str(where: str, v: Any, max_chars: int) -> None:
    if not isinstance(v, str) or len(v) > max_chars:
        _fail(where, f"must be a string of at most {max_chars} characters")


def _check_int(where: str, v: Any, lo: int, hi: int) -> None:
    if type(v) is not int or not (lo <= v <= hi):
        _fail(where, f"must be an integer in [{lo}, {hi}]")


def _check_number(where: str, v: Any) -> None:
    if type(v) not in (int, float) or not math.isfinite(v):
        _fail(where, "must be a finite number")


def _check_str_list(where: str, v: Any, max_items: int, max_chars: int) -> None:
    if not isinstance(v, list) or len(v) > max_items:
        _fail(where, f"must be a list of at most {max_items} strings")
    for i, item in enumerate(v):
        _check_str(f"{where}[{i}]", item, max_chars)


def _check_depth(where: str, v: Any) -> None:
    """Refuse values nested deeper than MAX_VALUE_DEPTH, without recursing."""
    stack = [(v, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > MAX_VALUE_DEPTH:
            _fail(where, f"nested deeper than {MAX_VALUE_DEPTH} levels")
        stack.extend((child, depth + 1) for child in children)


def _check_record(where: str, v: Any) -> dict[str, Any]:
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        _fail(where, "must be a map with string keys")
    return v


def check_member_field(author: str, field: str, v: Any) -> None:
    where = f"member/{field}"
    if field not in MEMBER_FIELDS:
        _fail(where, "unknown member field")
    if field == "peer_id":
        if v != author:
            _fail(where, "a member record may only describe its author")
    elif field in ("name", "version"):
        _check_str(where, v, 64)
    elif field == "reachability":
        _check_str(where, v, 32)
    elif field == "addrs":
        _check_str_list(where, v, 16, 256)
    elif field in ("heartbeat", "started"):
        _check_number(where, v)
        if v < 0:
            _fail(where, "must not be negative")
    elif field == "capabilities":
        caps = _check_record(where, v)
        unknown = set(caps) - CAPABILITY_FIELDS
        if unknown:
            _fail(where, f"unknown capabilities {sorted(unknown)}")
        if "cpus" in caps:
            _check_int(f"{where}/cpus", caps["cpus"], 0, 65536)
        if "tasks" in caps:
            _check_str_list(f"{where}/tasks", caps["tasks"], 64, 64)
        if "memory_mb" in caps:
            _check_int(f"{where}/memory_mb", caps["memory_mb"], 0, 2**40)


def check_job_spec(author: str, job_id: str, v: Any) -> None:
    where = f"jobs/{job_id}"
    spec = _check_record(where, v)
    if spec.get("submitter") != author:
        _fail(where, "a job spec may only be written by its submitter")
    if "id" in spec and spec["id"] != job_id:
        _fail(where, "spec id differs from its key")
    if "state" in spec and spec["state"] not in SPEC_STATES:
        _fail(where, f"a submitter may only set state to one of {SPEC_STATES}")


def check_participation(author: str, job_id: str, v: Any) -> None:
    where = f"participation/{job_id}"
    entry = _check_record(where, v)
    if entry.get("state") not in PARTICIPANT_STATES:
        _fail(where, f"state must be one of {PARTICIPANT_STATES}")
    if "job_state" in entry and entry["job_state"] not in CLAIMABLE_JOB_STATES:
        _fail(where, f"job_state must be one of {CLAIMABLE_JOB_STATES}")
    if "peer_id" in entry and entry["peer_id"] != author:
        _fail(where, "a participation entry may only describe its author")
    for name in SUMMED_FIELDS:
        if name in entry:
            _check_int(f"{where}/{name}", entry[name], 0, MAX_SEQ)


def check_model(author: str, model_id: str, v: Any) -> None:
    where = f"models/{model_id}"
    rec = _check_record(where, v)
    if rec.get("producer") != author:
        _fail(where, "a model record may only be written by its producer")
    if "job" in rec and not is_record_id(rec["job"]):
        _fail(f"{where}/job", "must be a job id")
    if "metrics" in rec:
        metrics = _check_record(f"{where}/metrics", rec["metrics"])
        if len(metrics) > 64:
            _fail(f"{where}/metrics", "at most 64 metrics")
        for name, value in metrics.items():
            _check_str(f"{where}/metrics", name, 64)
            _check_number(f"{where}/metrics/{name}", value)


def check_counter(author: str, name: str, v: Any) -> None:
    _check_int(f"counters/{name}", v, 0, MAX_SEQ)


_KEYED_CHECKS = {
    ROOT_JOBS: check_job_spec,
    ROOT_PARTICIPATION: check_participation,
    ROOT_MODELS: check_model,
    ROOT_COUNTERS: check_counter,
}


def check_entry(author: str, root: str, key: str, value: Any) -> None:
    """Raise OutOfBounds unless ``author`` may hold ``value`` at ``root/key``."""
    _check_depth(f"{root}/{str(key)[:MAX_KEY_CHARS]}", value)  # first: the checks below walk it
    if root == ROOT_MEMBER:
        check_member_field(author, key, value)
        return
    check = _KEYED_CHECKS.get(root)
    if check is None:
        _fail(root, "unknown root")
    if not is_record_id(key):
        _fail(f"{root}/{key[:MAX_KEY_CHARS]!r}", "not a valid record id")
    check(author, key, value)


def check_content(author: str, content: dict[str, dict[str, Any]]) -> None:
    """Raise OutOfBounds unless every record in ``content`` is one ``author`` may hold."""
    unknown = set(content) - set(ROOTS)
    if unknown:
        _fail(sorted(unknown)[0][:MAX_KEY_CHARS], "unknown root")
    for root, entries in content.items():
        for key, value in entries.items():
            check_entry(author, root, key, value)
    member = content.get(ROOT_MEMBER, {})
    if member and member.get("peer_id") != author:
        # without its peer_id a member record could be read as somebody else's
        _fail("member/peer_id", "a member record must name its author")


# -- local changes ----------------------------------------------------------------------

@dataclass(frozen=True)
class Set:
    """Write ``value`` at ``path`` (``"<root>/<key>"``) in our own document."""

    path: str
    value: Any


@dataclass(frozen=True)
class Delete:
    """Remove ``path`` (``"<root>/<key>"``) from our own document."""

    path: str


Change = Set | Delete


def split_path(path: str) -> tuple[str, str]:
    root, sep, key = path.partition("/")
    if not sep or root not in ROOTS or not key or "/" in key:
        raise ValueError(f"a change path is '<root>/<key>' with root in {ROOTS}: {path!r}")
    return root, key


def apply_changes(content: dict[str, dict[str, Any]], changes: list[Change]
                  ) -> dict[str, dict[str, Any]]:
    """The content after ``changes`` (a new dict; ``content`` is not modified)."""
    out = {root: dict(entries) for root, entries in content.items()}
    for change in changes:
        root, key = split_path(change.path)
        if isinstance(change, Set):
            out[root][key] = change.value
        elif isinstance(change, Delete):
            out[root].pop(key, None)
        else:
            raise TypeError(f"not a change: {change!r}")
    return out
