"""A pairwise exchange leaves both sides with the same bytes, or touches nothing;
local training state checkpoints and resumes exactly; the outer step is Nesterov."""

import numpy as np
import pytest

from lattice.learn.gossip import ParamChannel, exchange_in_process, pair_average, pair_weights
from lattice.learn.merge import load_npz, save_npz
from lattice.learn.optim import SGD, LocalTrainer, OuterNesterov, participant_rng
from lattice.learn.tasks import get_task
from lattice.learn.validate import InvalidTensor

RNG = np.random.default_rng(0)
A = RNG.normal(0, 1, 1000).astype(np.float32)
B = RNG.normal(0, 1, 1000).astype(np.float32)
REF = RNG.normal(0, 1, 1000).astype(np.float32)


@pytest.mark.parametrize("w", [(0.5, 0.5), (0.3, 0.7), (1 / 3, 2 / 3)])
def test_pair_average_is_bitwise_symmetric(w):
    ab = pair_average(A, B, *w)
    ba = pair_average(B, A, w[1], w[0])
    assert ab.tobytes() == ba.tobytes()
    np.testing.assert_allclose(ab, w[0] * A + w[1] * B, rtol=1e-6, atol=1e-6)


def test_pair_average_can_write_into_an_input():
    expected = pair_average(A, B, 0.3, 0.7)
    own = A.copy()
    assert pair_average(own, B, 0.3, 0.7, out=own) is own
    assert own.tobytes() == expected.tobytes()
    with pytest.raises(ValueError):
        pair_average(A, B, out=np.empty(1000, np.float64))


def test_pair_weights():
    assert pair_weights(100, 300, "uniform") == (0.5, 0.5)
    assert pair_weights(100, 300, "samples") == (0.25, 0.75)
    assert pair_weights(300, 100, "samples") == (0.75, 0.25)
    assert pair_weights(0, 0, "samples") == (0.5, 0.5)
    with pytest.raises(ValueError):
        pair_weights(1, 1, "median")


@pytest.mark.parametrize("codec", ["none", "fp16", "int8", "topk:0.1"])
def test_both_sides_end_with_the_same_bytes(codec):
    ca, cb = ParamChannel(codec, reference=REF), ParamChannel(codec, reference=REF)
    new_a, new_b, stats = exchange_in_process(A, B, ca, cb, 0.25, 0.75)
    assert new_a.tobytes() == new_b.tobytes() and new_a is not new_b
    if codec == "none":
        assert new_a.tobytes() == pair_average(A, B, 0.25, 0.75).tobytes()
        assert stats.bytes_a_to_b == 4000 + 8
    else:
        assert stats.total_bytes < 2 * 4000
        assert np.linalg.norm(new_a - (0.25 * A + 0.75 * B)) < np.linalg.norm(A - B)


def test_lossy_channel_keeps_what_it_dropped_for_the_next_send():
    ca, cb = ParamChannel("topk:0.1", reference=REF), ParamChannel("topk:0.1", reference=REF)
    out = ca.prepare(A)
    assert not ca.residual.any()  # prepare is pure
    exchange_in_process(A, B, ca, cb)
    # what A's side failed to transmit is exactly its residual
    np.testing.assert_allclose(ca.residual, A - out.estimate, atol=1e-6)


def test_garbage_from_the_peer_leaves_everything_untouched():
    ca, cb = ParamChannel("int8", reference=REF), ParamChannel("int8", reference=REF)
    good = ca.prepare(A)
    bad = dict(good.payload)
    bad["scale"] = np.full_like(bad["scale"], 1e30)  # a blow-up that decodes fine
    with pytest.raises(InvalidTensor) as err:
        cb.receive(bad, B)
    assert err.value.reason == "norm"
    nan_payload = ParamChannel("none").prepare(np.full(1000, np.nan, np.float32)).payload
    with pytest.raises(InvalidTensor, match="non_finite"):
        ParamChannel("none").receive(nan_payload, B)
    assert not cb.residual.any() and not ca.residual.any()


def test_channel_memory_survives_a_checkpoint():
    ca, cb = ParamChannel("int8", reference=REF), ParamChannel("int8", reference=REF)
    exchange_in_process(A, B, ca, cb)
    pending = ca.prepare(A)
    restored = ParamChannel("int8", reference=REF)
    restored.load_state(ca.state())
    np.testing.assert_array_equal(restored.residual, ca.residual)
    assert restored.prepare(A).estimate.tobytes() == pending.estimate.tobytes()
    ca.load_state(ca.state())
    with pytest.raises(RuntimeError, match="stale"):
        ca.commit(pending)
    assert ParamChannel("none").state() == {}


def test_lossy_channel_needs_the_shared_reference():
    with pytest.raises(ValueError, match="reference"):
        ParamChannel("fp16")


def test_outer_nesterov_applies_momentum_to_the_delta_since_last_sync():
    anchor = np.ones(4, np.float32)
    outer = OuterNesterov(anchor)  # lr 0.7, momentum 0.3
    target = np.zeros(4, np.float32)  # the sync moved us by -1
    first = outer.step(target)
    # g = 1, v = 1, update = g + 0.3 v = 1.3 -> 1 - 0.7 * 1.3
    np.testing.assert_allclose(first, 1 - 0.91, rtol=1e-6)
    second = outer.step(first - 1)  # another -1
    # v = 0.3 + 1 = 1.3, update = 1 + 0.3 * 1.3 = 1.39
    np.testing.assert_allclose(second, first - 0.7 * 1.39, rtol=1e-5)
    np.testing.assert_array_equal(outer.anchor, second)


def test_sgd_momentum_and_argument_checks():
    p = np.zeros(2, np.float32)
    opt = SGD(lr=0.1, momentum=0.5)
    opt.step(p, np.ones(2, np.float32))
    opt.step(p, np.ones(2, np.float32))
    np.testing.assert_allclose(p, -0.1 * (1 + 1.5))
    with pytest.raises(ValueError):
        SGD(lr=0)
    with pytest.raises(ValueError):
        SGD(lr=0.1, momentum=1.0)


def _trainer(task, X, y, seed=3):
    return LocalTrainer.create(task, task.init_params(0), X, y, lr=0.05, momentum=0.9, rng=participant_rng(seed, 1))


def test_local_trainer_walks_epochs_and_counts_samples():
    task = get_task("digits-softmax")
    X, y = task.train_data()
    t = _trainer(task, X[:10], y[:10])
    seen = np.concatenate([t.next_batch(4) for _ in range(5)])  # two full epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    report = t.run_steps(5, 16)  # batches larger than the local data still fill up
    assert t.step == 5 and t.samples_seen == 80 and len(report.losses) == 5
    assert report.first_step == 0 and np.isfinite(report.mean_loss)


def test_local_trainer_checkpoint_resumes_bit_for_bit(tmp_path):
    task = get_task("digits-mlp", hidden=8)
    X, y = task.train_data()
    X, y = X[:200], y[:200]
    a = _trainer(task, X, y)
    a.run_steps(7, 32)
    arrays, meta = a.state()
    save_npz(tmp_path / "ckpt.npz", arrays, meta)
    a.run_steps(9, 32)

    b = _trainer(task, X, y, seed=99)  # different RNG: the checkpoint must override it
    b.load_state(*load_npz(tmp_path / "ckpt.npz"))
    b.run_steps(9, 32)
    assert a.params.tobytes() == b.params.tobytes()
    assert (a.step, a.samples_seen) == (b.step, b.samples_seen) == (16, 512)
