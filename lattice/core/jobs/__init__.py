"""Jobs, pure: the lifecycle every kind shares, and each kind's spec.

Owns the job record and id (`compute_job_id`), the job and participant state machines,
roster selection, the reconciliation planner (`plan`: what this daemon should do about
one job, given the replicated view), the merge decisions, and the spec types of the
job kinds (`TrainSpec`, `AttachSpec`, `MergeJobSpec`), each parsed and bounded from a plain dict so the same
check runs on a spec typed by a user and one received from the network. Must not
import trio, libp2p, sockets, lattice.learn or read the clock: time is passed in as
``now``. The supervisor that runs jobs is `lattice.jobs`; the wire and state formats
are in proto/jobs.md.

Theory of operation
-------------------
A job lives in the replicated state (`lattice.core.state`):

- ``jobs/<job_id>`` is written by the submitter only: the kind, the spec, a nonce,
  ``state`` (``submitted`` or ``cancelled``) and, once enough volunteers joined, the
  ``roster``. The job id is a hash of (kind, spec, submitter, nonce), so anyone can
  check that a record says what its id commits to.
- ``participation/<job_id>`` is written by each participant about itself: its
  participant state, progress, its final contribution's blob, and ``job_state``
  claims (``running``, ``merging``, ``done``, ``failed``).

The job's status is the join (max in `STATUS_ORDER`) of the submitter's state and the
claims the views believe (`lattice.core.state.views`), so it only moves forward and
every peer computes the same status from the same records.

Selection. Daemons whose kind says they volunteer (the config accepts the task, or a
local user asked to join) write ``state: joined``. The submitter *seals* the roster:
the first ``max_peers`` live joiners in a deterministic order (SHA-256 of job id and
peer id, so the same peers are not always first), once ``min_peers`` have joined (and,
for a kind whose spec has a ``join_window``, once that window has passed or
``max_peers`` joined), stored sorted by peer id in its own record. Only one author writes the roster, so
there is nothing to agree on: each participant reads it and takes its rank (index in
the sorted roster). A joiner left out withdraws (``state: left``). Computing the roster
from the joined entries on every peer instead would let two peers that have seen
different joiners start different jobs.

Access. A record may limit who takes part to an allowlist of peer ids, or to peers
holding a token the submitter hands out (`lattice.core.jobs.access`): only eligible,
live joiners are sealed.

Merging. When its part is done each participant publishes its final contribution as a
blob and claims ``merging``. The merger is the lowest-rank roster member that
published a final and is not known to be dead; it merges once every roster member
published a final or left, or when ``merge_timeout`` has passed since it finished
(missing members are recorded). If the merger dies, the next candidate takes over
``takeover`` seconds later per position (`merge_decision`).
"""

from lattice.core.jobs.access import JoinRefused as JoinRefused
from lattice.core.jobs.access import job_token as job_token
from lattice.core.jobs.access import join_entry as join_entry
from lattice.core.jobs.access import join_proof as join_proof
from lattice.core.jobs.access import may_volunteer as may_volunteer
from lattice.core.jobs.attach import KIND_ATTACH as KIND_ATTACH
from lattice.core.jobs.attach import AttachSpec as AttachSpec
from lattice.core.jobs.attach import Manifest as Manifest
from lattice.core.jobs.attach import ManifestError as ManifestError
from lattice.core.jobs.attach import parse_attach_spec as parse_attach_spec
from lattice.core.jobs.attach import parse_manifest as parse_manifest
from lattice.core.jobs.lifecycle import DEFAULT_PARSERS as DEFAULT_PARSERS
from lattice.core.jobs.lifecycle import JOB_ID_HEX as JOB_ID_HEX
from lattice.core.jobs.lifecycle import JOB_TRANSITIONS as JOB_TRANSITIONS
from lattice.core.jobs.lifecycle import PARTICIPANT_TRANSITIONS as PARTICIPANT_TRANSITIONS
from lattice.core.jobs.lifecycle import STATUS_ORDER as STATUS_ORDER
from lattice.core.jobs.lifecycle import TERMINAL as TERMINAL
from lattice.core.jobs.lifecycle import Action as Action
from lattice.core.jobs.lifecycle import ClaimFailed as ClaimFailed
from lattice.core.jobs.lifecycle import IllegalTransition as IllegalTransition
from lattice.core.jobs.lifecycle import JobSpecLike as JobSpecLike
from lattice.core.jobs.lifecycle import Join as Join
from lattice.core.jobs.lifecycle import MergeDecision as MergeDecision
from lattice.core.jobs.lifecycle import Policy as Policy
from lattice.core.jobs.lifecycle import SealRoster as SealRoster
from lattice.core.jobs.lifecycle import SpecParser as SpecParser
from lattice.core.jobs.lifecycle import Start as Start
from lattice.core.jobs.lifecycle import Stop as Stop
from lattice.core.jobs.lifecycle import Withdraw as Withdraw
from lattice.core.jobs.lifecycle import check_transition as check_transition
from lattice.core.jobs.lifecycle import compute_job_id as compute_job_id
from lattice.core.jobs.lifecycle import final_of as final_of
from lattice.core.jobs.lifecycle import job_summary as job_summary
from lattice.core.jobs.lifecycle import join_window as join_window
from lattice.core.jobs.lifecycle import merge_decision as merge_decision
from lattice.core.jobs.lifecycle import new_job_record as new_job_record
from lattice.core.jobs.lifecycle import plan as plan
from lattice.core.jobs.lifecycle import rank_of as rank_of
from lattice.core.jobs.lifecycle import read_job as read_job
from lattice.core.jobs.lifecycle import select_roster as select_roster
from lattice.core.jobs.lifecycle import verify_record as verify_record
from lattice.core.jobs.merge import KIND_MERGE as KIND_MERGE
from lattice.core.jobs.merge import MergeJobSpec as MergeJobSpec
from lattice.core.jobs.merge import parse_merge_spec as parse_merge_spec
from lattice.core.jobs.spec import JobSpecError as JobSpecError
from lattice.core.jobs.train import ALGORITHMS as ALGORITHMS
from lattice.core.jobs.train import BUILTIN_TASKS as BUILTIN_TASKS
from lattice.core.jobs.train import CORRECTIONS as CORRECTIONS
from lattice.core.jobs.train import KIND_TRAIN as KIND_TRAIN
from lattice.core.jobs.train import WEIGHTINGS as WEIGHTINGS
from lattice.core.jobs.train import TrainSpec as TrainSpec
from lattice.core.jobs.train import parse_train_spec as parse_train_spec
