"""Jobs: `jobs.submit`, `jobs.join`, `jobs.list`, `jobs.get`, `jobs.cancel`, `jobs.stats`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from lattice.api.errors import (
    InvalidArgumentError,
    NotFoundError,
    NotReadyError,
    PermissionDeniedError,
)
from lattice.core.jobs import KIND_MERGE, STATUS_ORDER, JobSpecError, JoinRefused
from lattice.jobs import JobNotFound, JobSupervisor, NotSubmitter
from lattice.jobs.merge import prepare_merge_job
from latticed.localapi.modelerrors import translated
from latticed.localapi.state import wait_writable
from latticed.rpc_server import ClientConnection, Handler

if TYPE_CHECKING:
    from latticed.node import Node


def require_jobs(node: Node) -> JobSupervisor:
    if node.jobs is None:
        raise NotReadyError("the job runner is still starting; retry in a moment")
    return node.jobs


async def jobs_submit(node: Node, client: ClientConnection, spec: dict[str, Any],
                      allow: list[str] | None = None, private: bool = False) -> dict[str, Any]:
    jobs = require_jobs(node)
    await wait_writable(node)
    if spec.get("kind") == KIND_MERGE:  # names, weights or a mergekit config: the spec
        spec = await translated(prepare_merge_job(jobs.services.models, spec))
    access = {**({"allow": allow} if allow else {}), **({"token": True} if private else {})}
    try:
        job_id = jobs.submit(spec, access=access or None)
    except JobSpecError as e:
        raise InvalidArgumentError(f"bad job spec: {e}", data={"field": e.field}) from None
    return {"job_id": job_id, **({"token": jobs.token(job_id)} if private else {})}


async def wait_for_job(node: Node, job_id: str, timeout: float) -> dict[str, Any]:
    """The job's summary once it reached this daemon's replica (a job submitted
    elsewhere a moment ago may not have yet); NotFoundError after ``timeout`` s."""
    jobs = require_jobs(node)
    with trio.move_on_after(max(0.0, min(timeout, 300.0))):
        return await jobs.wait_job(job_id, frozenset(STATUS_ORDER))
    raise NotFoundError(f"no job {job_id} (not known here after {timeout:g} s)")


async def jobs_join(node: Node, client: ClientConnection, job_id: str,
                    token: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
    jobs = require_jobs(node)
    await wait_writable(node)
    summary = await wait_for_job(node, job_id, timeout)
    try:
        joined = jobs.join(job_id, token)
    except JobNotFound:
        raise NotFoundError(f"no job {job_id}") from None
    except JoinRefused as e:
        raise PermissionDeniedError(str(e)) from None
    return {**summary, "job_id": job_id, "joined": joined}


async def jobs_list(node: Node, client: ClientConnection) -> list[dict[str, Any]]:
    return require_jobs(node).list()


async def jobs_get(node: Node, client: ClientConnection, job_id: str) -> dict[str, Any]:
    try:
        return require_jobs(node).get(job_id)
    except JobNotFound:
        raise NotFoundError(f"no job {job_id}") from None


async def jobs_cancel(node: Node, client: ClientConnection, job_id: str) -> dict[str, Any]:
    jobs = require_jobs(node)
    await wait_writable(node)
    try:
        return {"cancelled": jobs.cancel(job_id)}
    except JobNotFound:
        raise NotFoundError(f"no job {job_id}") from None
    except NotSubmitter as e:
        raise PermissionDeniedError(f"only the submitter may cancel: {e}") from None


async def jobs_stats(node: Node, client: ClientConnection) -> dict[str, Any]:
    return require_jobs(node).statistics()


HANDLERS: dict[str, Handler] = {
    "jobs.submit": jobs_submit,
    "jobs.join": jobs_join,
    "jobs.list": jobs_list,
    "jobs.get": jobs_get,
    "jobs.cancel": jobs_cancel,
    "jobs.stats": jobs_stats,
}
