"""The pure train-job core: spec validation, job ids, the state machines, roster
selection, the reconciliation planner and the merge decision."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lattice.core import jobs as J
from lattice.core.state import views
from lattice.jobs.train import merge_finals
from lattice.learn.participant import check_spec, make_participant, merge_weights, participant_round
from lattice.learn.simulate import final_merge
from lattice.learn.tasks import get_task

ME, A, B, C, D = "me", "peer-a", "peer-b", "peer-c", "peer-d"


# -- spec ---------------------------------------------------------------------------------


def test_a_minimal_spec_gets_every_default_written_out():
    spec = J.parse_train_spec({"task": "digits-mlp"})
    body = spec.to_dict()
    assert body["task"] == "digits-mlp" and body["min_peers"] == 4 and body["task_options"] == {}
    assert J.parse_train_spec(body) == spec  # the stored form parses back to the same spec


@pytest.mark.parametrize("bad,field", [
    ({}, "task"),
    ({"task": "digits-mlp", "stpes": 10}, "stpes"),
    ({"task": "digits-mlp", "kind": "merge"}, "kind"),
    ({"task": "Digits MLP"}, "task"),
    ({"task": "digits-mlp", "steps": 0}, "steps"),
    ({"task": "digits-mlp", "steps": 10.0}, "steps"),
    ({"task": "digits-mlp", "steps": True}, "steps"),
    ({"task": "digits-mlp", "min_peers": 1000}, "min_peers"),
    ({"task": "digits-mlp", "lr": 0}, "lr"),
    ({"task": "digits-mlp", "lr": float("nan")}, "lr"),
    ({"task": "digits-mlp", "momentum": 1.0}, "momentum"),
    ({"task": "digits-mlp", "algorithm": "allreduce"}, "algorithm"),
    ({"task": "digits-mlp", "partition": "dirichlet:0"}, "partition"),
    ({"task": "digits-mlp", "partition": "shards"}, "partition"),
    ({"task": "digits-mlp", "compression": "topk:1.5"}, "compression"),
    ({"task": "digits-mlp", "compression": "int8:0"}, "compression"),
    ({"task": "digits-mlp", "compression": "zip"}, "compression"),
    ({"task": "digits-mlp", "weighting": "median"}, "weighting"),
    ({"task": "digits-mlp", "schedule": "often"}, "schedule"),
    ({"task": "digits-mlp", "schedule": "late:0"}, "schedule"),
    ({"task": "digits-mlp", "schedule": "tail:1.5"}, "schedule"),
    ({"task": "digits-mlp", "schedule": "constant:2"}, "schedule"),
    ({"task": "digits-mlp", "correction": "scaffold"}, "correction"),
    ({"task": "digits-mlp", "steps": 5, "sync_every": 6}, "sync_every"),
    ({"task": "digits-mlp", "task_options": {"hidden": [1]}}, "task_options.hidden"),
    ({"task": "digits-mlp", "task_options": {"bad name": 1}}, "task_options"),
    ({"task": "digits-mlp", "merge_timeout": 0.1}, "merge_timeout"),
    ("digits-mlp", "spec"),
])
def test_bad_specs_are_refused_naming_the_field(bad, field):
    with pytest.raises(J.JobSpecError) as err:
        J.parse_train_spec(bad)
    assert err.value.field == field


@pytest.mark.parametrize("partition", ["iid", "dirichlet:0.1", "dirichlet:5", "dirichlet:1e-2"])
@pytest.mark.parametrize("compression", ["none", "fp16", "int8", "int8:64", "topk:0.1", "topk:1"])
@pytest.mark.parametrize("schedule", ["constant", "late", "late:0.25", "tail", "tail:1"])
def test_what_the_core_accepts_the_learning_ring_accepts(partition, compression, schedule):
    spec = J.parse_train_spec({"task": "digits-mlp", "partition": partition, "compression": compression,
                               "schedule": schedule, "weighting": "samples", "correction": "logit-adjust"})
    check_spec(spec)  # does not raise


@given(st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.floats(), st.text(max_size=8),
                                                      st.none(), st.booleans()), max_size=6))
def test_arbitrary_maps_are_parsed_or_refused_never_crash(raw):
    try:
        J.parse_train_spec({"task": "digits-mlp", **raw})
    except J.JobSpecError:
        pass


# -- ids and records ----------------------------------------------------------------------


def test_the_job_id_commits_to_spec_submitter_and_nonce():
    spec = J.parse_train_spec({"task": "digits-mlp", "steps": 100})
    job_id, record = J.new_job_record(spec, A, "n" * 16, now=5.0)
    assert len(job_id) == 32 and record["id"] == job_id and record["state"] == "submitted"
    assert J.read_job(job_id, record) == spec
    assert J.new_job_record(spec, A, "n" * 16, now=99.0)[0] == job_id  # time is not part of it
    assert J.new_job_record(spec, B, "n" * 16, now=5.0)[0] != job_id
    assert J.new_job_record(spec, A, "m" * 16, now=5.0)[0] != job_id
    tampered = {**record, "spec": {**record["spec"], "steps": 101}}
    with pytest.raises(J.JobSpecError, match="id"):
        J.read_job(job_id, tampered)
    with pytest.raises(J.JobSpecError, match="roster"):
        J.read_job(job_id, {**record, "roster": [B, A]})
    assert J.read_job(job_id, {**record, "roster": [A, B], "state": "cancelled"}) == spec


# -- state machines -----------------------------------------------------------------------


def test_every_transition_moves_up_the_status_the_views_show():
    for old, news in J.JOB_TRANSITIONS.items():
        for new in news:
            # the status is a max of claims: an edge that went down could never be seen
            assert views.join_status(old, new) == new, (old, new)


def test_illegal_transitions_are_our_bug():
    J.check_transition(J.JOB_TRANSITIONS, "submitted", "running")
    J.check_transition(J.PARTICIPANT_TRANSITIONS, None, "joined")
    J.check_transition(J.PARTICIPANT_TRANSITIONS, "running", "running")
    for table, old, new in [(J.JOB_TRANSITIONS, "done", "running"), (J.JOB_TRANSITIONS, "running", "submitted"),
                            (J.PARTICIPANT_TRANSITIONS, "left", "running"),
                            (J.PARTICIPANT_TRANSITIONS, "joined", "done")]:
        with pytest.raises(J.IllegalTransition):
            J.check_transition(table, old, new)


# -- selection and planning ---------------------------------------------------------------


SPEC = J.TrainSpec(task="digits-softmax", min_peers=3)
JOB = "feedfacefeedfacefeedfacefeedface"


def view(*, submitter=A, state="submitted", roster=None, participants=None, status=None):
    record = {"id": JOB, "submitter": submitter, "state": state, "spec": SPEC.to_dict()}
    if roster is not None:
        record["roster"] = roster
    participants = participants or {}
    claims = [e["job_state"] for e in participants.values() if "job_state" in e]
    return {"id": JOB, "submitter": submitter, "spec": record, "participants": participants,
            "status": status or views.join_status(state, *claims)}


def joined(*peers):
    return {p: {"state": "joined"} for p in peers}


def test_the_roster_is_the_first_live_joiners_in_hash_order_sorted():
    assert J.select_roster(JOB, SPEC, joined(A, B)) is None
    roster = J.select_roster(JOB, SPEC, joined(A, B, C, D))
    assert len(roster) == 3 and roster == sorted(roster)
    reordered = dict(reversed(list(joined(A, B, C, D).items())))
    assert J.select_roster(JOB, SPEC, reordered) == roster  # independent of arrival order
    dead = roster[0]
    without = J.select_roster(JOB, SPEC, joined(A, B, C, D), alive=lambda p: p != dead)
    assert dead not in without and len(without) == 3
    assert J.rank_of(roster, roster[1]) == 1 and J.rank_of(roster, "stranger") is None


@dataclasses.dataclass(frozen=True)
class GatheringSpec:
    """A kind that takes 1 to 3 participants and keeps the roster open 5 s for more."""

    min_peers: int = 1
    max_peers: int = 3
    merge_timeout: float = 10.0
    join_window: float = 5.0

    def to_dict(self):
        return dataclasses.asdict(self)


def test_a_join_window_keeps_the_roster_open_until_it_passes_or_max_peers_joined():
    spec = GatheringSpec()
    assert J.select_roster(JOB, spec, joined(A), open_for=4.9) is None
    assert J.select_roster(JOB, spec, joined(A), open_for=5.0) == [A]
    assert J.select_roster(JOB, spec, joined(A, B, C), open_for=0.0) == sorted([A, B, C])
    assert J.select_roster(JOB, SPEC, joined(A, B, C), open_for=0.0) is not None  # train: no window
    v = view(submitter=ME, participants=joined(ME, A))
    v["spec"]["created"] = 100.0

    def seals(now):
        return [a for a in J.plan(ME, JOB, v, spec, volunteer=True, policy=J.Policy(), active=set(),
                                  reserved=1, now=now) if isinstance(a, J.SealRoster)]
    assert seals(104.0) == []
    assert seals(105.0) == [J.SealRoster(JOB, sorted([ME, A]))]
    assert seals(None) == [J.SealRoster(JOB, sorted([ME, A]))]  # no clock given: the window is over


def plan(me, v, *, active=(), reserved=0, policy=J.Policy(), alive=lambda p: True,
         volunteer=True):
    return J.plan(me, JOB, v, SPEC, volunteer=volunteer, policy=policy, active=set(active),
                  reserved=reserved, alive=alive)


def test_volunteers_join_only_tasks_they_accept_with_capacity_left_until_enough_joined():
    assert plan(ME, view()) == [J.Join(JOB)]
    assert plan(ME, view(), volunteer=False) == []  # the kind says no (config, no local ask)
    assert plan(ME, view(), reserved=1) == []
    assert plan(ME, view(participants=joined(A, B, C))) == []
    assert plan(ME, view(participants=joined(ME))) == []  # already in


def test_the_submitter_seals_the_roster_once_enough_joined():
    v = view(submitter=ME, participants=joined(ME, A, B))
    [seal] = [a for a in plan(ME, v) if isinstance(a, J.SealRoster)]
    assert sorted(seal.roster) == sorted([ME, A, B])
    assert plan(A, v) == []  # not the submitter: waits for the roster
    sealed = view(submitter=ME, roster=seal.roster, participants=joined(ME, A, B))
    assert not any(isinstance(a, J.SealRoster) for a in plan(ME, sealed))
    assert plan(ME, view(submitter=ME, state="cancelled", participants=joined(A, B, C))) == []


def test_members_of_the_roster_start_and_others_step_aside():
    roster = sorted([A, B, C])
    v = view(roster=roster, participants=joined(A, B, C, D))
    assert plan(B, v) == [J.Start(JOB, roster, roster.index(B), resume=False)]
    assert plan(D, v) == [J.Withdraw(JOB, "not_selected")]
    assert plan(B, v, active={JOB}) == []  # idempotent while running
    running = view(roster=roster, participants={**joined(A, C), B: {"state": "running", "job_state": "running"}})
    assert plan(B, running) == [J.Start(JOB, roster, roster.index(B), resume=True)]  # after a restart
    done = view(roster=roster, participants={B: {"state": "done", "job_state": "done"}})
    assert plan(B, done) == []
    drafted = view(roster=roster, participants=joined(A, C))  # B never volunteered
    assert plan(B, drafted) == []


def test_a_cancel_stops_runners_and_releases_joiners():
    roster = sorted([A, B, C])
    v = view(state="cancelled", roster=roster, participants=joined(A, B, C, D))
    assert v["status"] == "cancelled"
    assert plan(B, v, active={JOB}) == [J.Stop(JOB, "cancelled")]
    assert plan(D, v) == [J.Withdraw(JOB, "cancelled")]
    assert plan(ME, v) == []


# -- merging --------------------------------------------------------------------------------


def finals(*peers, samples=10):
    return {p: {"state": "merging", "final": {"blob": "b" * 64, "samples": samples}} for p in peers}


def decide(me, entries, now, roster=(A, B, C), dead=()):
    return J.merge_decision(list(roster), entries, me=me, now=now, deadline=100.0, takeover=30.0, dead=set(dead))


def test_the_lowest_rank_with_a_final_merges_when_all_are_in_or_time_is_up():
    partial = {**finals(A, B), C: {"state": "running"}}
    assert decide(A, partial, now=50).merger is None
    d = decide(A, partial, now=100)
    assert d.merger == A and d.inputs == [A, B] and d.missing == [C] and not d.complete
    everyone = finals(A, B, C)
    assert decide(A, everyone, now=0).merger == A and decide(A, everyone, now=0).complete
    assert decide(B, everyone, now=0).merger == A  # B knows A should merge
    left = {**finals(A, B), C: {"state": "left"}}
    assert decide(A, left, now=0).merger == A  # nobody else to wait for


def test_the_next_candidate_takes_over_late_and_the_dead_are_skipped():
    everyone = finals(A, B, C)
    assert decide(B, everyone, now=120).merger == A
    assert decide(B, everyone, now=131).merger == B  # deadline + 1 x takeover
    assert decide(C, everyone, now=131).merger == A
    assert decide(C, everyone, now=161).merger == C
    assert decide(B, everyone, now=0, dead={A}).merger == B


def test_the_network_merge_is_the_simulations_final_merge():
    task = get_task("digits-softmax")
    spec = J.TrainSpec(task="digits-softmax", min_peers=3, steps=6, sync_every=3, seed=2,
                       partition="dirichlet:0.5")
    people = [make_participant(spec, task, r) for r in range(3)]
    for p in people:
        participant_round(p, spec, steps=1 + p.rank)  # different samples seen
    merged, mid = final_merge(people, task, {"job": JOB})
    weights = merge_weights(spec.weighting, [(p.rank, p.trainer.samples_seen) for p in people],
                            people[0].part_sizes)
    assert weights == list(people[0].part_sizes)  # weighting "data": by partition size
    shuffled = [(p.rank, p.trainer.params, w) for p, w in reversed(list(zip(people, weights)))]
    ours, our_id, data = merge_finals(task, JOB, shuffled)
    assert ours.tobytes() == merged.tobytes() and our_id == mid
    assert np.frombuffer(data[-4 * task.num_params:], np.float32).size == task.num_params


def test_a_summary_is_compact_and_tolerates_partial_views():
    v = view(roster=[A, B, C], participants={A: {"state": "running", "loss": 0.5, "accuracy": 0.9, "steps": 4},
                                             B: {"state": "running", "loss": float("nan")}})
    v["totals"] = {"steps": 4, "bytes_sent": 10, "bytes_received": 12, "samples": 0}
    s = J.job_summary(v)
    assert s["status"] == "submitted" and s["loss"] == 0.5 and s["accuracy"] == 0.9
    assert s["steps_total"] == 3 * SPEC.steps and s["steps"] == 4 and s["model"] is None
    assert J.job_summary({"id": "x"})["status"] is None


def test_a_member_known_dead_is_not_waited_for():
    partial = {**finals(A, B), C: {"state": "running"}}
    assert decide(A, partial, now=0).merger is None
    d = decide(A, partial, now=0, dead={C})
    assert d.merger == A and d.complete and d.missing == [C]


def test_when_everyone_left_or_failed_a_member_claims_the_job_failed():
    roster = sorted([A, B, C])
    entries = {A: {"state": "failed", "reason": "task"}, B: {"state": "left"}, C: {"state": "running"}}
    assert plan(A, view(roster=roster, participants=entries)) == []  # C may still finish
    entries[C] = {"state": "failed"}
    v = view(roster=roster, participants=entries)
    assert plan(A, v) == [J.ClaimFailed(JOB)] and plan(B, v) == [J.ClaimFailed(JOB)]
    entries[A] = {**entries[A], "job_state": "failed"}
    assert plan(A, view(roster=roster, participants=entries)) == []  # terminal now
    with_final = {**entries, B: {"state": "left", "final": {"blob": "b" * 64, "samples": 3}}}
    assert plan(C, view(roster=roster, participants={**with_final, A: {"state": "failed"}})) == []
