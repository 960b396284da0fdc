"""Only the roster speaks for a job: a peer outside it cannot end or inflate the job."""

from lattice.core.state.views import job_view

JOB = "j1"
SUBMITTER, MEMBER, FORGER = "12D3KooWsubmitter", "12D3KooWmember", "12D3KooWforger"


def contents(roster, forger_entry):
    spec = {"submitter": SUBMITTER, "state": "submitted"}
    if roster is not None:
        spec["roster"] = roster
    return {
        SUBMITTER: {"jobs": {JOB: spec}},
        MEMBER: {"participation": {JOB: {"state": "training", "job_state": "running", "steps": 10}}},
        FORGER: {"participation": {JOB: forger_entry}},
    }


def test_claims_outside_the_roster_do_not_count():
    view = job_view(JOB, contents([MEMBER], {"job_state": "done", "steps": 10**9}))
    assert view["status"] == "running" and view["totals"]["steps"] == 10


def test_before_a_roster_no_participant_moves_the_job():
    view = job_view(JOB, contents(None, {"job_state": "failed"}))
    assert view["status"] == "submitted"


def test_roster_members_claims_count():
    view = job_view(JOB, contents([MEMBER, FORGER], {"job_state": "done", "steps": 5}))
    assert view["status"] == "done" and view["totals"]["steps"] == 15
