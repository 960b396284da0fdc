"""Jobs of every kind, run by one supervisor (`serve_jobs` -> `JobSupervisor`).

The kinds a daemon runs are registered in `KINDS` (name -> constructor taking the
supervisor's `Services`); a kind's contract is `lattice.jobs.kind.JobKind`. The
lifecycle decisions are pure (`lattice.core.jobs`); this package does the I/O, over a
`PeerNetwork`, so it runs unchanged over the libp2p host and `lattice.testing.memnet`.
Must not import libp2p.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from lattice.jobs.attach import AttachKind as AttachKind
from lattice.jobs.kind import Contribution as Contribution
from lattice.jobs.kind import Input as Input
from lattice.jobs.kind import JobKind as JobKind
from lattice.jobs.kind import KindLeft as KindLeft
from lattice.jobs.kind import KindRefused as KindRefused
from lattice.jobs.kind import OverLimit as OverLimit
from lattice.jobs.kind import Result as Result
from lattice.jobs.kind import Services as Services
from lattice.jobs.merge import MergeConfig as MergeConfig
from lattice.jobs.merge import MergeKind as MergeKind
from lattice.jobs.supervisor import Governance as Governance
from lattice.jobs.supervisor import JobNotFound as JobNotFound
from lattice.jobs.supervisor import JobsConfig as JobsConfig
from lattice.jobs.supervisor import JobSupervisor as JobSupervisor
from lattice.jobs.supervisor import NotSubmitter as NotSubmitter
from lattice.jobs.supervisor import Run as Run
from lattice.jobs.supervisor import serve_jobs as serve_jobs
from lattice.jobs.train import TrainKind as TrainKind

KINDS: Mapping[str, Callable[[Services], JobKind[Any]]] = {
    "train": TrainKind,
    "attach": AttachKind,
    "merge": MergeKind,
}


def builtin_kinds(services: Services) -> dict[str, JobKind[Any]]:
    """One instance of every registered kind, for one supervisor."""
    return {name: make(services) for name, make in KINDS.items()}
