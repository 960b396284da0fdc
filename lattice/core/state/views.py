"""Merged read-time views over all authors' contents: members, jobs, models, counters.

Owns the merge rules and who is believed: a record counts only from the author entitled
to write it, checked here, where it is read. Views are *incremental* (`Views`): indexes
kept up to date as each author's content changes, so a read costs what it returns, not
the number of authors. They depend only on the *set* of author contents (never on
arrival order), so peers holding the same envelopes show the same views. Must not
import trio, libp2p, pycrdt or read the clock (``now`` is passed in).

Merge rules (proto/crdt-sync.md, "Views"; proto/jobs.md, "Authority"):

- members: the authors with a member record; ``alive`` when the heartbeat is within
  ``timeout`` of ``now`` (and not further than ``timeout`` in the future, so a peer
  with a fast clock cannot look alive forever).
- jobs: a job record counts only under the author its id commits to
  (`lattice.core.jobs.verify_record`: the id is the hash of kind, spec, submitter and
  nonce, and the record is well formed): anyone can write a record under any key, but
  only the submitter can make one whose id matches. Any kind is shown (a daemon joins
  only the kinds it runs), so every peer shows the same jobs. An author's jobs beyond
  ``max_jobs_per_author`` (newest ``created`` first) are not shown. The job's status
  is the join (max in `STATUS_ORDER`) of the submitter's ``state`` (``submitted`` or
  ``cancelled``) and the claims of *roster members*: ``running`` and ``merging`` from
  any member; ``done`` only from a member that also claims the merged ``model`` and
  wrote that model record for this job (the merger, with a verifiable model);
  ``failed`` only once *every* member has given up (claims ``failed``, or its own
  state is ``left`` or ``failed``): no single participant can fail a job. Progress
  totals sum the roster members' counters.
- models: a model record naming a job counts only from that job's merger (a roster
  member whose participation claims ``done`` with that model id); a record naming no
  job (an import) counts as its producer's. The shown record is a merger's if there
  is one, else the smallest producer id's; ``producers`` lists every author whose
  record counts.
- counters: the sum over authors.

A max over a total order is commutative, associative and idempotent, so the status is
the same in any delivery order.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from lattice.core.jobs import STATUS_ORDER, JobSpecError, verify_record
from lattice.core.state.schema import (
    ROOT_COUNTERS,
    ROOT_JOBS,
    ROOT_MEMBER,
    ROOT_MODELS,
    ROOT_PARTICIPATION,
    SUMMED_FIELDS,
)

Content = Mapping[str, Mapping[str, Any]]
Contents = Mapping[str, Content]

_RANK = {s: i for i, s in enumerate(STATUS_ORDER)}
_GAVE_UP = ("left", "failed")
_EMPTY: Mapping[str, Any] = {}


class StatePathError(KeyError):
    """No value at this state path."""


def join_status(*states: str) -> str:
    """The join of job states: their maximum in STATUS_ORDER (``submitted`` if none)."""
    best = "submitted"
    for s in states:
        if _RANK[s] > _RANK[best]:
            best = s
    return best


Liveness = Callable[[str, float], "tuple[bool | None, float | None]"]
"""``(peer, now) -> (alive, age)`` from the failure detector (`lattice.core.membership`);
``alive`` None when it has no news of the peer."""


def member_view(author: str, content: Content, now: float,
                timeout: float, liveness: Liveness | None = None) -> dict[str, Any] | None:
    record = content.get(ROOT_MEMBER)
    if not record:
        return None
    out = dict(record)
    if liveness is not None:
        alive, age = liveness(author, now)
        if alive is not None:  # news from the failure detector beats the record's age
            out["alive"], out["age"] = alive, age
            return out
    beat = record.get("heartbeat")
    if beat is None:
        out["alive"], out["age"] = False, None
    else:
        age = now - beat
        out["alive"] = -timeout <= age <= timeout
        out["age"] = age
    return out


def _created(record: Mapping[str, Any]) -> float:
    value = record.get("created")
    if (type(value) is int or type(value) is float) and math.isfinite(value):  # not a bool
        return float(value)
    return 0.0


class Views:
    """The merged views of a changing set of author contents (module docstring).

    `update` is told every author's old and new content; reads return cached views
    (treat them as read-only) and recompute only what a change touched."""

    def __init__(self, *, max_jobs_per_author: int = 16) -> None:
        if max_jobs_per_author < 1:
            raise ValueError("max_jobs_per_author must be at least 1")
        self.max_jobs_per_author = max_jobs_per_author
        self.liveness: Liveness | None = None
        """Set by the daemon to its failure detector (`StateStore.set_liveness`)."""
        self._contents: dict[str, Content] = {}
        self._members: set[str] = set()
        self._valid_jobs: dict[str, dict[str, float]] = {}
        """author -> {job id: created} of its records whose id commits to it."""
        self._shown_jobs: dict[str, set[str]] = {}
        """author -> the job ids shown (its newest, within the quota)."""
        self._job_holder: dict[str, set[str]] = {}
        """job id -> authors whose shown record it is (one, barring a hash collision)."""
        self._participants: dict[str, set[str]] = {}
        self._producers: dict[str, set[str]] = {}
        self._models_of_job: dict[str, set[tuple[str, str]]] = {}
        """job id -> (model id, author) of every model record naming it."""
        self._counters: dict[str, dict[str, int]] = {}
        self._jobs: dict[str, dict[str, Any] | None] = {}
        self._models: dict[str, dict[str, Any] | None] = {}
        self.ignored: Counter[str] = Counter()
        """Records not believed, by reason (counted when the record changes)."""

    # -- maintenance ----------------------------------------------------------------------
    def update(self, author: str, old: Content | None, new: Content | None) -> list[str]:
        """``author``'s content changed from ``old`` to ``new`` (None: absent). Returns
        the view paths whose value may have changed, sorted."""
        old, new = old or _EMPTY, new or _EMPTY
        if new:
            self._contents[author] = new
        else:
            self._contents.pop(author, None)
        paths: set[str] = set()
        jobs: set[str] = set()
        models: set[str] = set()
        if old.get(ROOT_MEMBER) != new.get(ROOT_MEMBER):
            paths.add(f"members/{author}")
            (self._members.add if new.get(ROOT_MEMBER) else self._members.discard)(author)
        for job_id in self._changed(old, new, ROOT_JOBS):
            jobs.add(job_id)
            self._check_job(author, job_id, new.get(ROOT_JOBS, _EMPTY).get(job_id))
        if jobs:
            jobs |= self._apply_quota(author)
        for job_id in self._changed(old, new, ROOT_PARTICIPATION):
            jobs.add(job_id)
            _index(self._participants, job_id, author,
                   job_id in new.get(ROOT_PARTICIPATION, _EMPTY))
        for model_id in self._changed(old, new, ROOT_MODELS):
            models.add(model_id)
            was = _model_job(old.get(ROOT_MODELS, _EMPTY).get(model_id))
            now_names = _model_job(new.get(ROOT_MODELS, _EMPTY).get(model_id))
            for model_job, present in ((was, False), (now_names, True)):
                if model_job is not None:
                    jobs.add(model_job)  # a merged model backs (or stops backing) a done claim
                    _index(self._models_of_job, model_job, (model_id, author), present)
            _index(self._producers, model_id, author, model_id in new.get(ROOT_MODELS, _EMPTY))
        for name in self._changed(old, new, ROOT_COUNTERS):
            paths.add(f"counters/{name}")
            value = new.get(ROOT_COUNTERS, _EMPTY).get(name)
            by_author = self._counters.setdefault(name, {})
            if value is None:
                by_author.pop(author, None)
                if not by_author:
                    del self._counters[name]
            else:
                by_author[author] = value
        for job_id in jobs:
            # the models naming it: whether their producer is its merger may have changed
            models.update(m for m, _ in self._models_of_job.get(job_id, ()))
            self._jobs.pop(job_id, None)
            paths.add(f"jobs/{job_id}")
        for model_id in models:
            self._models.pop(model_id, None)
            paths.add(f"models/{model_id}")
        return sorted(paths)

    @staticmethod
    def _changed(old: Content, new: Content, root: str) -> set[str]:
        before, after = old.get(root, _EMPTY), new.get(root, _EMPTY)
        if before is after:
            return set()
        return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}

    def _check_job(self, author: str, job_id: str, record: Any) -> None:
        valid = self._valid_jobs.setdefault(author, {})
        valid.pop(job_id, None)
        if record is not None:
            try:
                verify_record(job_id, record)
            except JobSpecError:
                self.ignored["job_record"] += 1
            else:
                valid[job_id] = _created(record)
        if not valid:
            del self._valid_jobs[author]

    def _apply_quota(self, author: str) -> set[str]:
        """Re-pick ``author``'s shown jobs; returns the job ids that came or went."""
        valid = self._valid_jobs.get(author, {})
        newest = sorted(valid, key=lambda j: (-valid[j], j))
        shown = set(newest[:self.max_jobs_per_author])
        if len(valid) > len(shown):
            self.ignored["over_job_quota"] += 1
        before = self._shown_jobs.pop(author, set())
        if shown:
            self._shown_jobs[author] = shown
        for job_id in before - shown:
            _index(self._job_holder, job_id, author, False)
        for job_id in shown - before:
            _index(self._job_holder, job_id, author, True)
        return before ^ shown

    # -- members ------------------------------------------------------------------------------
    def member(self, author: str, now: float, timeout: float) -> dict[str, Any] | None:
        content = self._contents.get(author)
        return None if content is None else member_view(author, content, now, timeout,
                                                        self.liveness)

    def members(self, now: float, timeout: float) -> dict[str, dict[str, Any]]:
        out = {}
        for author in sorted(self._members):
            view = self.member(author, now, timeout)
            if view is not None:
                out[author] = view
        return out

    # -- jobs -----------------------------------------------------------------------------------
    def job(self, job_id: str) -> dict[str, Any] | None:
        if job_id not in self._job_holder:
            return None  # not cached: ids anyone names (a query, a model record) are free
        if job_id not in self._jobs:
            self._jobs[job_id] = self._job_view(job_id)
        return self._jobs[job_id]

    def jobs(self) -> dict[str, dict[str, Any]]:
        out = {}
        for job_id in sorted(self._job_holder):
            view = self.job(job_id)
            if view is not None:
                out[job_id] = view
        return out

    def _job_view(self, job_id: str) -> dict[str, Any] | None:
        holders = sorted(self._job_holder.get(job_id, ()))
        if not holders:
            return None
        submitter = holders[0]
        record = self._contents[submitter][ROOT_JOBS][job_id]
        participants = {a: self._contents[a][ROOT_PARTICIPATION][job_id]
                        for a in sorted(self._participants.get(job_id, ()))}
        roster = record.get("roster") or []
        # Anyone may write a participation entry for any job: only the roster the
        # submitter sealed speaks for the job (else any peer could end it or inflate it).
        speaking = {p: participants[p] for p in roster if p in participants}
        claims = [e["job_state"] for e in speaking.values()
                  if e.get("job_state") in ("running", "merging")]
        model = self._merged_model(job_id, speaking)
        if model is not None:
            claims.append("done")
        if roster and len(speaking) == len(roster) and all(
                e.get("job_state") == "failed" or e.get("state") in _GAVE_UP
                for e in speaking.values()):
            claims.append("failed")
        view = {
            "id": job_id,
            "submitter": submitter,
            "spec": record,
            "status": join_status(record.get("state", "submitted"), *claims),
            "participants": participants,
            "totals": {name: sum(e.get(name, 0) for e in speaking.values())
                       for name in SUMMED_FIELDS},
            "model": model,
        }
        if len(holders) > 1:
            view["conflicts"] = holders[1:]
        return view

    def _merged_model(self, job_id: str, speaking: Mapping[str, Mapping[str, Any]]) -> str | None:
        """The model id a roster member claims ``done`` with and wrote for this job."""
        backed = sorted(
            e["model"] for p, e in speaking.items()
            if e.get("job_state") == "done" and isinstance(e.get("model"), str)
            and _model_job(self._contents[p].get(ROOT_MODELS, _EMPTY).get(e["model"])) == job_id)
        return backed[0] if backed else None

    # -- models ---------------------------------------------------------------------------------
    def model(self, model_id: str) -> dict[str, Any] | None:
        if model_id not in self._producers:
            return None
        if model_id not in self._models:
            self._models[model_id] = self._model_view(model_id)
        return self._models[model_id]

    def models(self) -> dict[str, dict[str, Any]]:
        out = {}
        for model_id in sorted(self._producers):
            view = self.model(model_id)
            if view is not None:
                out[model_id] = view
        return out

    def _model_view(self, model_id: str) -> dict[str, Any] | None:
        mergers, importers = [], []
        for author in sorted(self._producers.get(model_id, ())):
            record = self._contents[author][ROOT_MODELS][model_id]
            job_id = _model_job(record)
            if job_id is None:
                importers.append(author)
            elif self._is_merger(author, job_id, model_id):
                mergers.append(author)
            else:
                self.ignored["model_record"] += 1
        believed = mergers + importers
        if not believed:
            return None
        record = self._contents[believed[0]][ROOT_MODELS][model_id]
        return {**record, "id": model_id, "producers": sorted(believed)}

    def _is_merger(self, author: str, job_id: str, model_id: str) -> bool:
        view = self.job(job_id)
        if view is None or author not in (view["spec"].get("roster") or []):
            return False
        entry = view["participants"].get(author, _EMPTY)
        return bool(entry.get("job_state") == "done" and entry.get("model") == model_id)

    # -- counters -------------------------------------------------------------------------------
    def counter(self, name: str) -> int | None:
        by_author = self._counters.get(name)
        return sum(by_author.values()) if by_author else None

    def counters(self) -> dict[str, int]:
        return {name: sum(self._counters[name].values()) for name in sorted(self._counters)}

    # -- everything -----------------------------------------------------------------------------
    def full(self, now: float, timeout: float) -> dict[str, Any]:
        return {"members": self.members(now, timeout), "jobs": self.jobs(),
                "models": self.models(), "counters": self.counters()}

    def resolve(self, path: str, now: float, timeout: float) -> Any:
        """The value at ``path`` in the merged view.

        Paths: ``""`` (everything), ``members[/<peer>[/<field>...]]``,
        ``jobs[/<job_id>[/...]]``, ``models[/<model_id>[/...]]``, ``counters[/<name>]``,
        and ``authors/<peer>[/<root>[/<key>...]]`` for one author's raw content.
        Raises StatePathError when nothing is there.
        """
        parts = [p for p in path.strip("/").split("/") if p]
        if not parts:
            return self.full(now, timeout)
        head, rest = parts[0], parts[1:]
        if head == "authors":
            if not rest:
                return sorted(self._contents)
            content = self._contents.get(rest[0])
            if content is None:
                raise StatePathError(path)
            return _descend({r: dict(e) for r, e in content.items()}, rest[1:], path)
        whole = {"members": lambda: self.members(now, timeout), "jobs": self.jobs,
                 "models": self.models, "counters": self.counters}
        one = {"members": lambda key: self.member(key, now, timeout), "jobs": self.job,
               "models": self.model, "counters": self.counter}
        if head not in whole:
            raise StatePathError(path)
        if not rest:
            return whole[head]()
        value = one[head](rest[0])
        if value is None:
            raise StatePathError(path)
        return _descend(value, rest[1:], path)

    def referenced(self, roots: Iterable[str], now: float, timeout: float) -> set[str]:
        """The authors an honest peer needs, starting from ``roots`` (ourselves and the
        peers we are connected to) and every live member: the submitter of every job
        one of them takes part in, the roster of every job one of them submitted, and
        (through the rosters) the mergers of those jobs' models. The rest may go when
        the state budget is short (proto/crdt-sync.md, "Quotas")."""
        seen = {a for a in roots if a in self._contents}
        seen |= {a for a in self._members
                 if (self.member(a, now, timeout) or _EMPTY).get("alive")}
        todo = list(seen)
        while todo:
            author = todo.pop()
            content = self._contents.get(author, _EMPTY)
            linked: set[str] = set()
            for job_id in content.get(ROOT_PARTICIPATION, _EMPTY):
                linked |= self._job_holder.get(job_id, set())
            for job_id in self._shown_jobs.get(author, ()):
                roster = content[ROOT_JOBS][job_id].get("roster") or []
                linked.update(p for p in roster if p in self._contents)
            for other in linked - seen:
                seen.add(other)
                todo.append(other)
        return seen

    def statistics(self) -> dict[str, Any]:
        return {"jobs": len(self._job_holder), "models": len(self._producers),
                "members": len(self._members), "cached": len(self._jobs) + len(self._models),
                "ignored": dict(self.ignored)}


def _index(index: dict[str, set[Any]], key: str, member: Any, present: bool) -> None:
    if present:
        index.setdefault(key, set()).add(member)
    else:
        members = index.get(key)
        if members is not None:
            members.discard(member)
            if not members:
                del index[key]


def _model_job(record: Any) -> str | None:
    job = record.get("job") if isinstance(record, Mapping) else None
    return job if isinstance(job, str) else None


def _descend(value: Any, parts: list[str], path: str) -> Any:
    for part in parts:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise StatePathError(path)
    return value


# -- the same views from a set of contents at once (tests, one-off reads) ---------------------

def build(contents: Contents, *, max_jobs_per_author: int = 16) -> Views:
    views = Views(max_jobs_per_author=max_jobs_per_author)
    for author, content in contents.items():
        views.update(author, None, content)
    return views


def members_view(contents: Contents, now: float, timeout: float) -> dict[str, dict[str, Any]]:
    return build(contents).members(now, timeout)


def job_view(job_id: str, contents: Contents) -> dict[str, Any] | None:
    return build(contents).job(job_id)


def jobs_view(contents: Contents) -> dict[str, dict[str, Any]]:
    return build(contents).jobs()


def model_view(model_id: str, contents: Contents) -> dict[str, Any] | None:
    return build(contents).model(model_id)


def models_view(contents: Contents) -> dict[str, dict[str, Any]]:
    return build(contents).models()


def counters_view(contents: Contents) -> dict[str, int]:
    return build(contents).counters()


def full_view(contents: Contents, now: float, timeout: float) -> dict[str, Any]:
    return build(contents).full(now, timeout)


def resolve(contents: Contents, path: str, now: float, timeout: float) -> Any:
    return build(contents).resolve(path, now, timeout)
