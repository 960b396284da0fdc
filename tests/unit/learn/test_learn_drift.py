"""Drift correction (logit-adjust): the offset is the local label prior, absent classes
get no gradient, the model itself is untouched, and tasks without logits refuse it."""

import dataclasses

import numpy as np
import pytest

from lattice.core.jobs import JobSpecError, TrainSpec, parse_train_spec
from lattice.learn.drift import CorrectionSpecError, logit_offset
from lattice.learn.participant import make_participant
from lattice.learn.tasks import get_task


def test_the_offset_is_the_log_of_the_local_label_frequencies():
    off = logit_offset("logit-adjust", np.array([0, 0, 0, 2]), 4)
    assert off.dtype == np.float32
    np.testing.assert_allclose(off[[0, 2]], np.log([0.75, 0.25]), rtol=1e-6)
    assert np.isneginf(off[1]) and np.isneginf(off[3])
    assert logit_offset("none", np.array([0, 1]), 2) is None


@pytest.mark.parametrize("name", ["digits-mlp", "digits-softmax"])
def test_an_absent_class_gets_no_gradient_and_the_loss_stays_finite(name):
    task = get_task(name)
    X, y = task.train_data()
    keep = np.isin(y, [1, 7])
    Xb, yb = X[keep][:40], y[keep][:40]
    off = logit_offset("logit-adjust", yb, task.n_classes)
    params = task.init_params(0)
    loss, grad = task.loss_and_grad(params, Xb, yb, logit_offset=off)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    out = "b2" if "b2" in task.unflatten(grad) else "b"
    absent = [c for c in range(10) if c not in (1, 7)]
    assert (task.unflatten(grad)[out][absent] == 0).all()
    assert (task.unflatten(grad)[out][[1, 7]] != 0).all()


def test_a_constant_offset_changes_nothing_which_is_why_iid_is_unaffected():
    task = get_task("digits-mlp", hidden=8)
    X, y = task.train_data()
    params = task.init_params(1)
    _, plain = task.loss_and_grad(params, X[:32], y[:32])
    _, shifted = task.loss_and_grad(params, X[:32], y[:32], logit_offset=np.full(10, -2.3, np.float32))
    np.testing.assert_allclose(shifted, plain, rtol=1e-4, atol=1e-6)


def test_the_offset_gradient_matches_central_differences():
    task = get_task("digits-mlp", hidden=8)
    X, y = task.train_data()
    Xb, yb = X[:20].astype(np.float64), y[:20]
    off = np.log(np.linspace(0.05, 0.2, 10) / np.linspace(0.05, 0.2, 10).sum())
    rng = np.random.default_rng(0)
    params = task.init_params(3).astype(np.float64) + rng.normal(0, 0.1, task.num_params)
    _, grad = task.loss_and_grad(params, Xb, yb, logit_offset=off)
    for i in rng.choice(task.num_params, size=30, replace=False):
        plus, minus = params.copy(), params.copy()
        plus[i] += 1e-6
        minus[i] -= 1e-6
        numeric = (task.loss_and_grad(plus, Xb, yb, logit_offset=off)[0]
                   - task.loss_and_grad(minus, Xb, yb, logit_offset=off)[0]) / 2e-6
        assert grad[i] == pytest.approx(numeric, rel=1e-4, abs=1e-7)


def test_a_participant_trains_on_its_own_prior_and_evaluates_plain_logits():
    spec = TrainSpec(task="digits-softmax", min_peers=4, steps=5, partition="dirichlet:0.1", seed=1,
                     correction="logit-adjust")
    task = get_task(spec.task)
    p = make_participant(spec, task, 2)
    labels = p.trainer.y
    np.testing.assert_array_equal(p.trainer.logit_offset, logit_offset("logit-adjust", labels, 10))
    plain = make_participant(dataclasses.replace(spec, correction="none"), task, 2)
    assert plain.trainer.logit_offset is None
    p.trainer.run_steps(5, 16)
    plain.trainer.run_steps(5, 16)
    assert not np.array_equal(p.trainer.params, plain.trainer.params)


def test_tasks_without_logits_and_unknown_corrections_are_refused():
    spec = TrainSpec(task="breast-cancer-logreg", min_peers=2, correction="logit-adjust")
    with pytest.raises(CorrectionSpecError, match="softmax"):
        make_participant(spec, get_task(spec.task), 0)
    with pytest.raises(CorrectionSpecError, match="scaffold"):
        make_participant(dataclasses.replace(spec, correction="scaffold"), get_task(spec.task), 0)
    with pytest.raises(JobSpecError, match="correction"):
        parse_train_spec({"task": "digits-mlp", "correction": "scaffold"})
    assert parse_train_spec({"task": "digits-mlp", "correction": "logit-adjust"}).correction == "logit-adjust"
