"""Merge rules as properties: any delivery order, with any duplication, gives the same views."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lattice.core.identity import Identity
from lattice.core.jobs import TrainSpec, new_job_record
from lattice.core.state import Delete, Set, StateLimits, StateStore, open_envelope
from lattice.core.state.views import STATUS_ORDER, build, join_status

NOW = 500.0
AUTHORS = [Identity.generate() for _ in range(3)]
statuses = st.sampled_from(STATUS_ORDER)


@given(statuses, statuses)
def test_job_status_join_is_commutative(a, b):
    assert join_status(a, b) == join_status(b, a)


@given(statuses, statuses, statuses)
def test_job_status_join_is_associative(a, b, c):
    assert join_status(join_status(a, b), c) == join_status(a, join_status(b, c))


@given(statuses)
def test_job_status_join_is_idempotent(a):
    assert join_status(a, a) == a


@given(st.lists(statuses))
def test_job_status_only_moves_forward(states):
    joined = join_status(*states)
    assert all(STATUS_ORDER.index(joined) >= STATUS_ORDER.index(s) for s in states)


SPEC = TrainSpec(task="digits-softmax", min_peers=3)
# every author's three job records: real ones, so that the views believe them
RECORDS = {(i, k): new_job_record(SPEC, a.peer_id, f"nonce-{i}-{k}-0123456", NOW - k)
           for i, a in enumerate(AUTHORS) for k in range(3)}
ROSTER = sorted(a.peer_id for a in AUTHORS)


def _op(author_index: int, kind: str, n: int):
    me = AUTHORS[author_index].peer_id
    own_id, own = RECORDS[(author_index, n % 3)]
    job, _ = RECORDS[(n % 3, n % 2)]  # anyone's job, to take part in
    model = f"m{n % 2}"
    return {
        "member": [Set("member/peer_id", me), Set("member/heartbeat", float(NOW - n))],
        "submit": [Set(f"jobs/{own_id}", own)],
        "seal": [Set(f"jobs/{own_id}", {**own, "roster": ROSTER})],
        "cancel": [Set(f"jobs/{own_id}", {**own, "state": "cancelled"})],
        "progress": [Set(f"participation/{job}", {
            "state": "running", "job_state": ("running", "merging", "failed")[n % 3],
            "samples": n})],
        "done": [Set(f"participation/{job}", {"state": "done", "job_state": "done",
                                               "model": model})],
        "model": [Set(f"models/{model}", {"producer": me, "job": job, "metrics": {"acc": n / 10}})],
        "import": [Set(f"models/{model}", {"producer": me, "metrics": {"acc": n / 10}})],
        "count": [Set(f"counters/c{n % 2}", n)],
        "delete": [Delete(f"jobs/{own_id}"), Delete(f"counters/c{n % 2}"),
                   Delete(f"models/{model}")],
    }[kind]


ops = st.lists(st.tuples(st.integers(0, 2),
                         st.sampled_from(["member", "submit", "seal", "cancel", "progress",
                                          "done", "model", "import", "count", "delete"]),
                         st.integers(0, 20)), min_size=1, max_size=25)


def _history(operations):
    """Each author writes its part; returns (every envelope, the authors' stores)."""
    # tiny snapshot threshold so histories include snapshots (log compaction) too
    limits = StateLimits(snapshot_min_bytes=600)
    writers = [StateStore(a, limits=limits) for a in AUTHORS]
    envelopes = []
    for index, kind, n in operations:
        env = writers[index].apply_local(_op(index, kind, n), NOW)
        if env is not None:
            envelopes.append(env.raw)
    return envelopes, writers


def _deliver(raws):
    store = StateStore(Identity.generate(), limits=StateLimits(max_gap_per_author=64))
    for raw in raws:
        result = store.receive(raw, NOW)
        assert not result.penalize, result
    return store


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.randoms(use_true_random=False), st.integers(0, 3))
def test_any_order_and_duplication_converges_to_the_authors_view(operations, rnd, dup):
    envelopes, writers = _history(operations)
    # the union of what the authors hold, as one honest peer in order would see it
    reference = _deliver(envelopes)
    shuffled = envelopes + [rnd.choice(envelopes) for _ in range(dup * len(envelopes))]
    rnd.shuffle(shuffled)
    other = _deliver(shuffled)
    # (at most 25 envelopes: the gap buffer of 64 holds any order)
    assert other.get("", NOW) == reference.get("", NOW)
    assert other.summary() == reference.summary()
    # every author's own view of itself equals what the others see of it
    for writer in writers:
        own = writer.own_content()
        seen = reference.contents().get(writer.peer_id)
        if writer.summary():
            assert seen == own


@settings(max_examples=30, deadline=None)
@given(ops, st.randoms(use_true_random=False))
def test_merging_two_replicas_is_commutative_and_idempotent(operations, rnd):
    envelopes, writers = _history(operations)
    by_author = {w.peer_id: [r for r in envelopes if _author(r) == w.peer_id] for w in writers}

    def replica():
        # a replica holds a prefix of each author's history, received in any order
        held = [r for rs in by_author.values() for r in rs[:rnd.randrange(len(rs) + 1)]]
        rnd.shuffle(held)
        return held

    held_a, held_b = replica(), replica()

    def merge(into, frm):
        for env in frm.missing_for(into.summary()):
            into.receive(env.raw, NOW)

    a, b = _deliver(held_a), _deliver(held_b)
    ab, ba = _deliver(held_a), _deliver(held_b)
    merge(ab, b)
    merge(ba, a)
    assert ab.get("", NOW) == ba.get("", NOW)
    assert ab.summary() == ba.summary()
    view = ab.get("", NOW)
    merge(ab, ba)  # merging again changes nothing
    assert ab.get("", NOW) == view


def _author(raw):
    return open_envelope(raw).author


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.randoms(use_true_random=False))
def test_incremental_views_equal_views_rebuilt_from_scratch(operations, rnd):
    """The store keeps its views up to date change by change; at every step they are
    what the same contents give when merged all at once."""
    envelopes, _ = _history(operations)
    rnd.shuffle(envelopes)
    # authors write three jobs each: a quota of two makes the shown set shift too
    store = StateStore(Identity.generate(), limits=StateLimits(max_gap_per_author=64,
                                                               max_jobs_per_author=2))
    for raw in envelopes:
        store.receive(raw, NOW)
        rebuilt = build(store.contents(), max_jobs_per_author=2)
        assert store.get("", NOW) == rebuilt.full(NOW, 60.0)
