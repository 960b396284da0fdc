"""Merged read-time views over all authors' contents: members, jobs, models, counters.

Owns the merge rules. Every function is pure and depends only on the *set* of author
contents (never on arrival order), so peers holding the same envelopes show the same
views. Must not import trio, libp2p, pycrdt or read the clock (``now`` is passed in).

Merge rules (proto/crdt-sync.md, "Views"):

- members: the set of authors with a member record; ``alive`` when the author's
  heartbeat is within ``timeout`` of ``now`` (and not further than ``timeout`` in the
  future, so a peer with a fast clock cannot look alive forever).
- jobs: the submitter's spec joined with every author's participation entry for that
  job id. The status is the maximum, in `STATUS_ORDER`, of the submitter's spec state
  (``submitted`` or ``cancelled``: only the submitter may cancel) and the participants'
  ``job_state`` claims. A max over a total order is commutative, associative and
  idempotent, so the status is the same in any delivery order. Per-author numeric
  progress fields (`SUMMED_FIELDS`) are summed.
- models: a model id's record; if several producers registered the same
  content-addressed id, all are listed and the smallest peer id's record is shown.
- counters: the sum over authors.

Where two authors hold a spec under the same job id, the smallest submitter id wins
and the others are listed in ``conflicts`` (job ids should be unique: the training
layer derives them from the submitter and a nonce).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lattice.core.state.schema import (
    ROOT_COUNTERS,
    ROOT_JOBS,
    ROOT_MEMBER,
    ROOT_MODELS,
    ROOT_PARTICIPATION,
    SUMMED_FIELDS,
)

Contents = Mapping[str, Mapping[str, Mapping[str, Any]]]

STATUS_ORDER = ("submitted", "running", "merging", "failed", "cancelled", "done")
_RANK = {s: i for i, s in enumerate(STATUS_ORDER)}
TERMINAL = frozenset({"failed", "cancelled", "done"})


class StatePathError(KeyError):
    """No value at this state path."""


def join_status(*states: str) -> str:
    """The join of job states: their maximum in STATUS_ORDER (``submitted`` if none)."""
    best = "submitted"
    for s in states:
        if _RANK[s] > _RANK[best]:
            best = s
    return best


def member_view(author: str, content: Mapping[str, Mapping[str, Any]], now: float,
                timeout: float) -> dict[str, Any] | None:
    record = content.get(ROOT_MEMBER)
    if not record:
        return None
    out = dict(record)
    beat = record.get("heartbeat")
    if beat is None:
        out["alive"], out["age"] = False, None
    else:
        age = now - beat
        out["alive"] = -timeout <= age <= timeout
        out["age"] = age
    return out


def members_view(contents: Contents, now: float, timeout: float) -> dict[str, dict[str, Any]]:
    out = {}
    for author in sorted(contents):
        view = member_view(author, contents[author], now, timeout)
        if view is not None:
            out[author] = view
    return out


def job_view(job_id: str, contents: Contents) -> dict[str, Any] | None:
    submitters = sorted(a for a, c in contents.items() if job_id in c.get(ROOT_JOBS, {}))
    if not submitters:
        return None
    submitter = submitters[0]
    spec = contents[submitter][ROOT_JOBS][job_id]
    participants = {}
    for author in sorted(contents):
        entry = contents[author].get(ROOT_PARTICIPATION, {}).get(job_id)
        if entry is not None:
            participants[author] = entry
    # Anyone may write a participation entry for any job, so only the roster the
    # submitter published speaks for the job: before it exists no participant claim
    # counts, after it only roster members' claims and counters do (else any peer could
    # mark any job done or failed, or inflate its totals).
    roster = spec.get("roster")
    members = set(roster) if isinstance(roster, list) else set()
    speaking = {p: e for p, e in participants.items() if p in members}
    claims = [e["job_state"] for e in speaking.values() if "job_state" in e]
    totals = {name: sum(e.get(name, 0) for e in speaking.values())
              for name in SUMMED_FIELDS}
    view = {
        "id": job_id,
        "submitter": submitter,
        "spec": spec,
        "status": join_status(spec.get("state", "submitted"), *claims),
        "participants": participants,
        "totals": totals,
    }
    if len(submitters) > 1:
        view["conflicts"] = submitters[1:]
    return view


def _keys(contents: Contents, root: str) -> set[str]:
    keys: set[str] = set()
    for content in contents.values():
        keys.update(content.get(root, {}))
    return keys


def jobs_view(contents: Contents) -> dict[str, dict[str, Any]]:
    out = {}
    for job_id in sorted(_keys(contents, ROOT_JOBS)):
        view = job_view(job_id, contents)
        assert view is not None
        out[job_id] = view
    return out


def model_view(model_id: str, contents: Contents) -> dict[str, Any] | None:
    producers = sorted(a for a, c in contents.items() if model_id in c.get(ROOT_MODELS, {}))
    if not producers:
        return None
    record = contents[producers[0]][ROOT_MODELS][model_id]
    return {**record, "id": model_id, "producers": producers}


def models_view(contents: Contents) -> dict[str, dict[str, Any]]:
    out = {}
    for model_id in sorted(_keys(contents, ROOT_MODELS)):
        view = model_view(model_id, contents)
        assert view is not None
        out[model_id] = view
    return out


def counter_value(name: str, contents: Contents) -> int | None:
    values = [c[ROOT_COUNTERS][name] for c in contents.values()
              if name in c.get(ROOT_COUNTERS, {})]
    return sum(values) if values else None


def counters_view(contents: Contents) -> dict[str, int]:
    out = {}
    for name in sorted(_keys(contents, ROOT_COUNTERS)):
        value = counter_value(name, contents)
        assert value is not None
        out[name] = value
    return out


def full_view(contents: Contents, now: float, timeout: float) -> dict[str, Any]:
    return {
        "members": members_view(contents, now, timeout),
        "jobs": jobs_view(contents),
        "models": models_view(contents),
        "counters": counters_view(contents),
    }


def _descend(value: Any, parts: list[str], path: str) -> Any:
    for part in parts:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise StatePathError(path)
    return value


def resolve(contents: Contents, path: str, now: float, timeout: float) -> Any:
    """The value at ``path`` in the merged view.

    Paths: ``""`` (everything), ``members[/<peer>[/<field>...]]``,
    ``jobs[/<job_id>[/...]]``, ``models[/<model_id>[/...]]``, ``counters[/<name>]``,
    and ``authors/<peer>[/<root>[/<key>...]]`` for one author's raw content.
    Raises StatePathError when nothing is there.
    """
    parts = [p for p in path.strip("/").split("/") if p]
    if not parts:
        return full_view(contents, now, timeout)
    head, rest = parts[0], parts[1:]
    if head == "authors":
        if not rest:
            return sorted(contents)
        content = contents.get(rest[0])
        if content is None:
            raise StatePathError(path)
        return _descend({r: dict(e) for r, e in content.items()}, rest[1:], path)
    whole = {
        "members": lambda: members_view(contents, now, timeout),
        "jobs": lambda: jobs_view(contents),
        "models": lambda: models_view(contents),
        "counters": lambda: counters_view(contents),
    }
    one = {
        "members": lambda key: member_view(key, contents.get(key, {}), now, timeout),
        "jobs": lambda key: job_view(key, contents),
        "models": lambda key: model_view(key, contents),
        "counters": lambda key: counter_value(key, contents),
    }
    if head not in whole:
        raise StatePathError(path)
    if not rest:
        return whole[head]()
    value = one[head](rest[0])
    if value is None:
        raise StatePathError(path)
    return _descend(value, rest[1:], path)
