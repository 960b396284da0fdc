"""Attached loops: `attach.open`, `attach.wait`, `attach.sync`, `attach.finish`,
`attach.detach` (proto/attach.md).

A session belongs to the connection that opened it: other connections cannot use it,
and when that connection closes (the loop's process died) the session is released and
the daemon leaves the job. Every method is ``write`` access: only our uid (or root)
attaches a loop, and the shared memory must be the caller's own (SO_PEERCRED uid).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from lattice.api.errors import (
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
    NotReadyError,
    PermissionDeniedError,
)
from lattice.attach.shm import SharedRegionError, map_region, slot_of
from lattice.core.jobs import TERMINAL, JoinRefused, ManifestError, parse_manifest
from lattice.jobs import AttachKind, JobNotFound
from lattice.jobs.attach import LoopSession, SessionError
from latticed.localapi.jobs import require_jobs, wait_for_job
from latticed.localapi.state import wait_writable
from latticed.rpc_server import ClientConnection, Handler

if TYPE_CHECKING:
    from latticed.node import Node


def require_attach(node: Node) -> AttachKind:
    kind = require_jobs(node).kinds.get("attach")
    if not isinstance(kind, AttachKind):
        raise NotReadyError("this daemon does not run attach jobs")
    return kind


def _session(node: Node, client: ClientConnection, session_id: str) -> LoopSession:
    session = require_attach(node).session(session_id)
    if session is None or session.owner is not client:
        raise NotFoundError(f"no attach session {session_id} on this connection (a restarted "
                            "daemon forgets sessions: attach again)")
    return session


async def attach_open(node: Node, client: ClientConnection, job_id: str,
                      tensors: list[Any]) -> dict[str, Any]:
    kind = require_attach(node)
    jobs = require_jobs(node)
    fd = client.take_fd()
    if fd is None:
        raise InvalidArgumentError("attach.open needs the loop's shared memory: pass a memfd "
                                   "with the request (SCM_RIGHTS), as lattice.attach does")
    try:
        manifest = parse_manifest(tensors, max_tensors=kind.config.max_tensors,
                                  max_params=kind.max_params)
    except ManifestError as e:
        os.close(fd)
        kind.counts["refused_manifest"] += 1
        raise InvalidArgumentError(f"bad manifest: {e}") from None
    try:
        region = map_region(fd, uid=client.uid, nbytes=manifest.region_bytes)  # closes fd
    except SharedRegionError as e:
        kind.counts["refused_memory"] += 1
        raise InvalidArgumentError(f"bad shared memory: {e}") from None
    await wait_writable(node)
    summary = await wait_for_job(node, job_id, 30.0)
    if summary["kind"] != "attach":
        raise InvalidArgumentError(f"job {job_id} is a {summary['kind']} job, not an attach job")
    ours = jobs.get(job_id)["participants"].get(jobs.me, {})
    if summary["status"] in TERMINAL:
        raise ConflictError(f"job {job_id} has ended ({summary['status']})")
    if ours.get("state") in ("left", "failed", "done"):
        raise ConflictError(f"this daemon's part in job {job_id} ended ({ours.get('state')}: "
                            f"{ours.get('reason', '-')})")
    if summary["roster"] and jobs.me not in summary["roster"]:
        raise ConflictError(f"job {job_id} started without this daemon")
    try:
        if ours.get("state") is None:  # not yet (a private job's joiner joined with its token)
            jobs.join(job_id)
        session = kind.attach(job_id, manifest, region, slot_of(region), owner=client)
    except JobNotFound:
        raise NotFoundError(f"no job {job_id}") from None
    except JoinRefused as e:
        raise PermissionDeniedError(str(e)) from None
    except SessionError as e:
        raise ConflictError(str(e)) from None
    client.on_close(lambda: kind.release(session, "its connection closed"))
    return {"session": session.id, "job_id": job_id, "spec": jobs.get(job_id)["spec"],
            "parameters": manifest.num_params}


async def attach_wait(node: Node, client: ClientConnection, session: str, until: str,
                      timeout: float) -> dict[str, Any]:
    s = _session(node, client, session)
    if until not in ("ready", "done"):
        raise InvalidArgumentError("until must be 'ready' or 'done'")
    limit = require_attach(node).config.max_wait
    try:
        return await s.wait(until, max(0.0, min(timeout, limit)))
    except SessionError as e:
        raise ConflictError(str(e)) from None


async def attach_sync(node: Node, client: ClientConnection, session: str, steps: int,
                      samples: int, loss: float | None) -> dict[str, Any]:
    return await _request(node, client, session, steps, samples, loss, finish=False)


async def attach_finish(node: Node, client: ClientConnection, session: str, steps: int,
                        samples: int) -> dict[str, Any]:
    return await _request(node, client, session, steps, samples, None, finish=True)


async def _request(node: Node, client: ClientConnection, session: str, steps: int,
                   samples: int, loss: float | None, *, finish: bool) -> dict[str, Any]:
    s = _session(node, client, session)
    if steps < 0 or samples < 0:
        raise InvalidArgumentError("steps and samples must be >= 0")
    try:
        return await s.request(steps, samples, loss, finish=finish)
    except SessionError as e:
        raise ConflictError(str(e)) from None


async def attach_detach(node: Node, client: ClientConnection, session: str) -> dict[str, Any]:
    s = _session(node, client, session)
    require_attach(node).release(s, "it detached")
    return {"detached": True}


HANDLERS: dict[str, Handler] = {
    "attach.open": attach_open,
    "attach.wait": attach_wait,
    "attach.sync": attach_sync,
    "attach.finish": attach_finish,
    "attach.detach": attach_detach,
}
