"""Records mean what they say: a view believes a record only from the author entitled
to write it (proto/jobs.md, "Authority"), whatever anyone else writes."""

import pytest

from lattice.core.jobs import TrainSpec, new_job_record
from lattice.core.state.views import StatePathError, build, job_view, model_view

SUBMITTER, MEMBER, OTHER = "12D3KooWsubmitter", "12D3KooWmember", "12D3KooWother"
FORGER = "12D3KooWaaaa"  # sorts before everyone: once enough to take a job over
SPEC = TrainSpec(task="digits-softmax", min_peers=2)
JOB, RECORD = new_job_record(SPEC, SUBMITTER, "00112233445566778899aabbccddeeff", 100.0)
MODEL = "ab" * 32


def record(**fields):
    return {**RECORD, **fields}


def contents(*, roster=None, **entries):
    """``{author: content}``: the submitter's record (sealed with ``roster``) and
    ``entries``: author -> {root: {key: value}} for everyone else."""
    out = {SUBMITTER: {"jobs": {JOB: record(roster=roster) if roster else record()}}}
    for author, content in entries.items():
        author = {"member": MEMBER, "other": OTHER, "forger": FORGER}[author]
        out.setdefault(author, {}).update(content)
    return out


def part(**entry):
    return {"participation": {JOB: entry}}


# -- job records ------------------------------------------------------------------------------

def test_a_record_under_someone_elses_job_id_is_ignored():
    hijack = {"jobs": {JOB: record(submitter=FORGER, roster=[FORGER], state="submitted")}}
    view = job_view(JOB, {**contents(), FORGER: hijack})
    assert view["submitter"] == SUBMITTER and "conflicts" not in view
    assert view["spec"] == RECORD
    # alone (the victim's record not received yet), it shows nothing at all
    assert job_view(JOB, {FORGER: hijack}) is None


def test_a_record_must_commit_to_its_own_id_and_parse():
    other_spec = record(spec={**RECORD["spec"], "steps": 7})
    assert job_view(JOB, {SUBMITTER: {"jobs": {JOB: other_spec}}}) is None
    assert job_view(JOB, {SUBMITTER: {"jobs": {JOB: record(nonce="another-nonce")}}}) is None
    assert job_view("j1", {SUBMITTER: {"jobs": {"j1": record(id="j1")}}}) is None


def test_any_kind_is_shown_if_its_id_commits_to_it_and_summarized_with_care():
    """Views check who wrote a record, not a kind's spec (a daemon joins only the kinds
    it runs): every peer shows the same jobs, and odd spec values cannot break a summary."""
    from lattice.core.jobs import compute_job_id, job_summary

    odd_spec = {**RECORD["spec"], "steps": "many", "min_peers": [2]}
    job_id = compute_job_id(odd_spec, SUBMITTER, RECORD["nonce"], "someday-kind")
    odd = {**RECORD, "id": job_id, "kind": "someday-kind", "spec": odd_spec}
    views = build({SUBMITTER: {"jobs": {job_id: odd}}})
    summary = job_summary(views.job(job_id))
    assert summary["kind"] == "someday-kind" and summary["steps_total"] == 0
    assert summary["min_peers"] is None
    # a record that is not even well formed is not shown
    for bad in ({**odd, "nonce": 7}, {**odd, "spec": "a spec"}, {**odd, "roster": "all"},
                {**odd, "access": {"allow": []}}):
        views = build({SUBMITTER: {"jobs": {job_id: bad}}})
        assert views.job(job_id) is None and views.statistics()["ignored"] == {"job_record": 1}


def test_an_authors_jobs_beyond_the_quota_are_not_shown_newest_first():
    jobs = {}
    for i in range(5):
        job_id, rec = new_job_record(SPEC, SUBMITTER, f"nonce-{i:08d}", 100.0 + i)
        jobs[job_id] = rec
    views = build({SUBMITTER: {"jobs": jobs}}, max_jobs_per_author=3)
    newest = sorted(jobs, key=lambda j: -jobs[j]["created"])[:3]
    assert sorted(views.jobs()) == sorted(newest)


# -- who moves the status ---------------------------------------------------------------------

def test_claims_outside_the_roster_do_not_count():
    view = job_view(JOB, contents(roster=[MEMBER], member=part(state="running",
                                                              job_state="running", steps=10),
                                  forger=part(state="running", job_state="done", model=MODEL,
                                              steps=10**9)))
    assert view["status"] == "running" and view["totals"]["steps"] == 10


def test_before_a_roster_no_participant_moves_the_job():
    view = job_view(JOB, contents(member=part(state="joined", job_state="failed")))
    assert view["status"] == "submitted"


def test_done_needs_the_claimers_own_model_record_for_this_job():
    claim = part(state="done", job_state="done", model=MODEL)
    merged = {"models": {MODEL: {"producer": MEMBER, "job": JOB}}}
    bare = contents(roster=[MEMBER, OTHER], member=claim)
    assert job_view(JOB, bare)["status"] == "submitted" and job_view(JOB, bare)["model"] is None
    backed = contents(roster=[MEMBER, OTHER], member={**claim, **merged})
    assert job_view(JOB, backed)["status"] == "done" and job_view(JOB, backed)["model"] == MODEL
    # a model record written by someone else does not back the member's claim
    elsewhere = contents(roster=[MEMBER, OTHER], member=claim,
                         other={"models": {MODEL: {"producer": OTHER, "job": JOB}}})
    assert job_view(JOB, elsewhere)["status"] == "submitted"
    # nor does one written for another job
    wrong_job = contents(roster=[MEMBER, OTHER], member={
        **claim, "models": {MODEL: {"producer": MEMBER, "job": "another-job"}}})
    assert job_view(JOB, wrong_job)["status"] == "submitted"


def test_one_member_cannot_fail_the_job_every_member_giving_up_does():
    failing = part(state="failed", job_state="failed")
    running = part(state="running", job_state="running")
    one = contents(roster=[MEMBER, OTHER], member=failing, other=running)
    assert job_view(JOB, one)["status"] == "running"
    absent = contents(roster=[MEMBER, OTHER], member=failing)  # the other never wrote
    assert job_view(JOB, absent)["status"] == "submitted"
    everyone = contents(roster=[MEMBER, OTHER], member=failing, other=part(state="left"))
    assert job_view(JOB, everyone)["status"] == "failed"


def test_only_the_submitter_cancels():
    cancelled = {SUBMITTER: {"jobs": {JOB: record(state="cancelled")}}}
    assert job_view(JOB, cancelled)["status"] == "cancelled"


# -- model records ------------------------------------------------------------------------------

def test_a_model_naming_a_job_is_shown_only_from_that_jobs_merger():
    forged = {"models": {MODEL: {"producer": FORGER, "job": JOB, "metrics": {"accuracy": 1.0}}}}
    assert model_view(MODEL, contents(roster=[MEMBER, OTHER], forger=forged)) is None
    # a roster member that does not claim done with it is no merger either
    member_record = {"models": {MODEL: {"producer": MEMBER, "job": JOB}}}
    assert model_view(MODEL, contents(roster=[MEMBER, OTHER], member=member_record)) is None
    merger = {**member_record, **part(state="done", job_state="done", model=MODEL)}
    view = model_view(MODEL, contents(roster=[MEMBER, OTHER], member=merger, forger=forged))
    assert view["producer"] == MEMBER and view["producers"] == [MEMBER]


def test_an_imported_model_is_its_importers_and_never_under_a_job():
    imported = {"models": {MODEL: {"producer": OTHER, "format": "safetensors"}}}
    views = build(contents(roster=[MEMBER, OTHER], other=imported))
    assert views.model(MODEL)["producers"] == [OTHER] and "job" not in views.model(MODEL)
    assert views.job(JOB)["model"] is None and views.job(JOB)["status"] == "submitted"


def test_jobs_move_in_and_out_of_the_quota_as_their_author_writes():
    from lattice.core.identity import Identity
    from lattice.core.state import Delete, Set, StateLimits, StateStore

    me = Identity.generate()
    store = StateStore(me, limits=StateLimits(max_jobs_per_author=2))
    events = []
    store.subscribe(lambda ev: events.append((ev.path, ev.value is not None)))
    ids = []
    for i in range(3):
        job_id, rec = new_job_record(SPEC, me.peer_id, f"nonce-{i:08d}", 100.0 + i)
        ids.append(job_id)
        store.apply_local([Set(f"jobs/{job_id}", rec)], 0.0)
    assert sorted(store.jobs()) == sorted(ids[1:])  # the oldest fell out...
    assert (f"jobs/{ids[0]}", False) in events  # ...and readers were told
    with pytest.raises(StatePathError):  # asked for while hidden
        store.get(f"jobs/{ids[0]}", 0.0)
    store.apply_local([Delete(f"jobs/{ids[2]}")], 0.0)
    assert sorted(store.jobs()) == sorted(ids[:2])  # back, not a stale cache
    assert events[-2:] == sorted([(f"jobs/{ids[0]}", True), (f"jobs/{ids[2]}", False)])


def test_asking_for_jobs_and_models_that_do_not_exist_costs_no_memory():
    views = build(contents(roster=[MEMBER]))
    for i in range(1000):
        assert views.job(f"no-such-job-{i}") is None and views.model(f"m{i}") is None
    assert views.statistics()["cached"] == 0
