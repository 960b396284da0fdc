"""Who may take part in a job, pure: private jobs among known machines.

Owns the record's ``access`` field and its checks, the submitter's token, joiners'
proofs, and whether a joiner may be sealed. Must not import trio, libp2p, sockets or
read the clock. Specified in proto/jobs.md, "Private jobs".

A job record may restrict who takes part (``access``, outside the job id: the
submitter may widen it later): ``allow``, a list of peer ids, and/or ``token``: only
joiners whose participation entry carries ``proof`` = HMAC-SHA256(token, job id ‖ 0 ‖
peer id) are sealed. The token is derived from the submitter's key (`job_token`), so
it is never stored or replicated and survives restarts; the submitter hands it out of
band and a joiner proves it holds it without revealing it. Volunteers never join a
token job on their own (its submitter may), nor an allowlist job that does not list
them (`may_volunteer`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping
from typing import Any

from lattice.core.jobs.spec import JobSpecError

ACCESS_FIELDS = frozenset({"allow", "token"})
MAX_ALLOW = 256
_TOKEN_DOMAIN = b"lattice/job-token/1\x00"
_PROOF_DOMAIN = b"lattice/job-join/1\x00"
_TERMINAL = frozenset({"done", "failed", "cancelled"})


class JoinRefused(ValueError):
    """This peer may not join this job (not on its allowlist, or no token given)."""


def normalize_access(access: Mapping[str, Any]) -> dict[str, Any]:
    """``access`` as stored in a record (the allowlist sorted); raises JobSpecError."""
    out = {k: (sorted(set(v)) if k == "allow" and isinstance(v, list) else v)
           for k, v in access.items()}
    check_access(out)
    return out


def check_access(access: Any) -> None:
    """Raise JobSpecError unless ``access`` is a well-formed record field."""
    if not isinstance(access, Mapping) or not access or set(access) - ACCESS_FIELDS:
        raise JobSpecError("access", f"must be a map of {sorted(ACCESS_FIELDS)}")
    allow = access.get("allow")
    if allow is not None and not (
            isinstance(allow, list) and 1 <= len(allow) <= MAX_ALLOW
            and all(isinstance(p, str) and 0 < len(p) <= 128 for p in allow)
            and allow == sorted(set(allow))):
        raise JobSpecError("access", f"allow must be 1..{MAX_ALLOW} sorted distinct peer ids")
    if "token" in access and access["token"] is not True:
        raise JobSpecError("access", "token, if present, is true")


def job_token(identity: Any, job_id: str) -> str:
    """The token of our job ``job_id``: a keyed hash of it under a key derived from our
    identity's secret (``identity.seed``), so only the submitter can make it, and it
    needs no storage."""
    key = hashlib.sha256(_TOKEN_DOMAIN + identity.seed).digest()
    return hmac.new(key, job_id.encode(), hashlib.sha256).hexdigest()[:32]


def join_proof(token: str, job_id: str, peer: str) -> str:
    """What a joiner holding ``token`` writes as ``proof`` in its participation entry."""
    return hmac.new(token.encode(), _PROOF_DOMAIN + f"{job_id}\x00{peer}".encode(),
                    hashlib.sha256).hexdigest()


def _access(record: Mapping[str, Any]) -> Mapping[str, Any]:
    access = record.get("access")
    return access if isinstance(access, Mapping) else {}


def may_volunteer(record: Mapping[str, Any], peer: str) -> bool:
    """Whether ``peer`` may join the job without being handed a token (the submitter
    holds its own)."""
    access = _access(record)
    if "allow" in access and peer not in access["allow"]:
        return False
    return not access.get("token") or peer == record.get("submitter")


def eligible(job_id: str, record: Mapping[str, Any], token: str | None
             ) -> Callable[[str, Mapping[str, Any]], bool]:
    """Whether a joiner (peer id, its entry) may be sealed into the roster; ``token``:
    the job's, known to its submitter only."""
    access = _access(record)

    def check(peer: str, entry: Mapping[str, Any]) -> bool:
        if "allow" in access and peer not in access["allow"]:
            return False
        if access.get("token") and peer != record.get("submitter"):
            proof = entry.get("proof")
            return token is not None and isinstance(proof, str) and hmac.compare_digest(
                proof, join_proof(token, job_id, peer))
        return True

    return check


def join_entry(me: str, job_id: str, view: Mapping[str, Any], now: float,
               token: str | None = None) -> dict[str, Any] | None:
    """The participation entry with which ``me`` joins the job (an explicit join, as
    `lattice jobs join`); None when we take part already. Raises JoinRefused."""
    if view.get("status") in _TERMINAL:
        raise JoinRefused(f"job {job_id} is {view.get('status')}")
    record = view.get("spec", {})
    access = _access(record)
    if "allow" in access and me not in access["allow"]:
        raise JoinRefused(f"job {job_id} is limited to peers on its allowlist")
    if access.get("token") and not token and me != record.get("submitter"):
        raise JoinRefused(f"job {job_id} is private: it needs the submitter's token")
    if view.get("participants", {}).get(me, {}).get("state") is not None:
        return None  # joined or took part already (a participant never rejoins)
    if record.get("roster"):
        raise JoinRefused(f"job {job_id} has its roster already")
    entry: dict[str, Any] = {"peer_id": me, "state": "joined", "updated": float(now)}
    if token:
        entry["proof"] = join_proof(token, job_id, me)
    return entry
