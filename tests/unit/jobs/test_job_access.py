"""Private jobs: an allowlist of peer ids, or a token the submitter hands out. Only
eligible joiners are sealed into the roster; the token never enters replicated state."""

import pytest

from lattice.core import jobs as J
from lattice.core.codec import canonical
from lattice.core.identity import Identity

SUBMITTER = Identity(bytes(range(32)))
ME, A, B, C = SUBMITTER.peer_id, "peer-a", "peer-b", "peer-c"
SPEC = J.TrainSpec(task="digits-softmax", min_peers=2)


def job(access=None):
    return J.new_job_record(SPEC, ME, "00112233445566778899aabbccddeeff", 0.0, access=access)


def view(record, participants=None, status="submitted"):
    return {"id": record["id"], "submitter": ME, "spec": record,
            "participants": participants or {}, "status": status}


def plan(me, v, token=None):
    return J.plan(me, v["id"], v, SPEC, volunteer=True, policy=J.Policy(), active=set(),
                  reserved=0, token=token)


def test_the_token_is_the_submitters_alone_and_stays_out_of_the_record():
    job_id, record = job({"token": True})
    token = J.job_token(SUBMITTER, job_id)
    assert token == J.job_token(SUBMITTER, job_id)  # derived again after a restart
    assert token != J.job_token(Identity.generate(), job_id)
    assert token != J.job_token(SUBMITTER, "another-job")
    assert token.encode() not in canonical(record) and record["access"] == {"token": True}
    assert J.read_job(job_id, record) == SPEC  # access is outside the id


def test_volunteers_join_an_allowlist_job_only_if_listed_and_never_a_token_job():
    _, listed = job({"allow": [B, A]})
    assert listed["access"] == {"allow": [A, B]}  # stored sorted
    assert plan(A, view(listed)) == [J.Join(listed["id"])]
    assert plan(C, view(listed)) == []
    _, private = job({"token": True})
    assert plan(A, view(private)) == []
    assert plan(ME, view(private)) == [J.Join(private["id"])]  # its submitter holds the token


def test_the_submitter_seals_only_joiners_whose_proof_checks():
    job_id, record = job({"token": True})
    token = J.job_token(SUBMITTER, job_id)
    participants = {
        A: J.join_entry(A, job_id, view(record), 0.0, token),
        B: {"state": "joined", "proof": J.join_proof("a guessed token", job_id, B)},
        C: {"state": "joined"},
    }
    assert plan(ME, view(record, participants), token=token) == []  # only A is eligible
    participants[C] = J.join_entry(C, job_id, view(record), 0.0, token)
    [seal] = plan(ME, view(record, participants), token=token)
    assert seal == J.SealRoster(job_id, sorted([A, C]))
    # a proof is bound to its peer: B cannot replay A's
    participants = {A: participants[A], B: {**participants[A], "peer_id": B}}
    assert plan(ME, view(record, participants), token=token) == []
    # without the token the submitter seals nobody but itself
    assert plan(ME, view(record, {A: participants[A], C: {"state": "joined"}})) == []
    [seal] = plan(ME, view(record, {A: participants[A], ME: {"state": "joined"}}), token=token)
    assert seal.roster == sorted([A, ME])


def test_the_submitter_seals_only_listed_joiners():
    job_id, record = job({"allow": [A, B]})
    participants = {p: {"state": "joined"} for p in (A, C)}
    assert plan(ME, view(record, participants)) == []
    participants[B] = {"state": "joined"}
    [seal] = plan(ME, view(record, participants))
    assert seal.roster == [A, B]


def test_an_explicit_join_checks_access_and_carries_the_proof():
    job_id, record = job({"allow": [A], "token": True})
    token = J.job_token(SUBMITTER, job_id)
    with pytest.raises(J.JoinRefused, match="allowlist"):
        J.join_entry(B, job_id, view(record), 0.0, token)
    with pytest.raises(J.JoinRefused, match="token"):
        J.join_entry(A, job_id, view(record), 0.0)
    entry = J.join_entry(A, job_id, view(record), 5.0, token)
    assert entry == {"peer_id": A, "state": "joined", "updated": 5.0,
                     "proof": J.join_proof(token, job_id, A)}
    assert J.join_entry(A, job_id, view(record, {A: entry}), 6.0, token) is None
    with pytest.raises(J.JoinRefused, match="roster"):
        J.join_entry(A, job_id, view({**record, "roster": [B]}), 0.0, token)
    with pytest.raises(J.JoinRefused, match="cancelled"):
        J.join_entry(A, job_id, view(record, status="cancelled"), 0.0, token)
    _, public = job()
    assert J.join_entry(C, public["id"], view(public), 0.0) == {
        "peer_id": C, "state": "joined", "updated": 0.0}


@pytest.mark.parametrize("access", [{}, {"token": False}, {"allow": []}, {"allow": [B, A]},
                                    {"allow": [A, A]}, {"allow": "A"}, {"owner": A},
                                    {"allow": [A] * 300}])
def test_malformed_access_is_refused(access):
    job_id, record = job()
    with pytest.raises(J.JobSpecError, match="access"):
        J.read_job(job_id, {**record, "access": access})


def test_a_job_joined_but_never_sealed_is_left_after_the_join_timeout():
    """Anyone may submit a job and never seal it: our slot must not be held forever."""
    _, record = job()
    waiting = view(record, {A: {"state": "joined", "updated": 100.0}})
    policy = J.Policy(max_jobs=1, join_timeout=60.0)

    def plan_at(me, now):
        return J.plan(me, record["id"], waiting, SPEC, volunteer=True, policy=policy,
                      active=set(), reserved=1, now=now)

    assert plan_at(A, 150.0) == []
    assert plan_at(A, 161.0) == [J.Withdraw(record["id"], "not_sealed")]
    # its submitter does not give up on its own job
    mine = view(record, {ME: {"state": "joined", "updated": 100.0}})
    assert J.plan(ME, record["id"], mine, SPEC, volunteer=True, policy=policy, active=set(),
                  reserved=1, now=1e9) == []
