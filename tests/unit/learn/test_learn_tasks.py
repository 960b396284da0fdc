"""Built-in tasks: analytic gradients match finite differences, data splits are fixed,
plugins load only when allowed."""

import gzip
import sys

import numpy as np
import pytest

from lattice.learn import tasks as tasks_mod
from lattice.learn.tasks import DatasetsUnavailable, Task, TaskError, builtin_task_names, get_task

CASES = [
    ("digits-softmax", {}),
    ("digits-softmax", {"l2": 0.01}),
    ("digits-mlp", {"hidden": 8}),
    ("digits-mlp", {"hidden": 8, "activation": "tanh", "l2": 0.01}),
    ("breast-cancer-logreg", {}),
    ("breast-cancer-logreg", {"l2": 0.1}),
]


@pytest.mark.parametrize("name,options", CASES)
def test_analytic_gradient_matches_central_differences(name, options):
    task = get_task(name, **options)
    X, y = task.train_data()
    Xb, yb = X[:20].astype(np.float64), y[:20]
    rng = np.random.default_rng(1)
    # float64 params: the task computes in the params' dtype, so differences are exact enough
    params = task.init_params(3).astype(np.float64) + rng.normal(0, 0.1, task.num_params)
    loss, grad = task.loss_and_grad(params, Xb, yb)
    assert grad.shape == params.shape and grad.dtype == np.float64
    eps = 1e-6
    for i in rng.choice(task.num_params, size=min(40, task.num_params), replace=False):
        plus, minus = params.copy(), params.copy()
        plus[i] += eps
        minus[i] -= eps
        numeric = (task.loss_and_grad(plus, Xb, yb)[0] - task.loss_and_grad(minus, Xb, yb)[0]) / (2 * eps)
        assert grad[i] == pytest.approx(numeric, rel=1e-4, abs=1e-7), f"{name} param {i}"
    assert loss == pytest.approx(task.loss_and_grad(params, Xb, yb)[0])


def _data_or_skip(task):
    try:
        return task.train_data()
    except DatasetsUnavailable as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("name", builtin_task_names())
def test_float32_params_layout_and_init_are_deterministic(name):
    task = get_task(name)
    _data_or_skip(task)
    p = task.init_params(7)
    assert p.dtype == np.float32 and p.shape == (task.num_params,)
    np.testing.assert_array_equal(p, task.init_params(7))
    assert not np.array_equal(p, task.init_params(8))
    blocks = task.unflatten(p)
    assert [b for b, _ in task.layout] == list(blocks)
    assert sum(v.size for v in blocks.values()) == task.num_params
    np.testing.assert_array_equal(task.flatten(blocks), p)
    blocks[next(iter(blocks))][...] = 5  # views, not copies
    assert p[0] == 5
    loss, grad = task.loss_and_grad(p, *task.train_data())
    assert grad.dtype == np.float32 and np.isfinite(loss)


def test_mlp_layout_is_documented_order():
    task = get_task("digits-mlp", hidden=16)
    assert task.layout == (("W1", (64, 16)), ("b1", (16,)), ("W2", (16, 10)), ("b2", (10,)))
    assert task.num_params == 64 * 16 + 16 + 16 * 10 + 10


def test_held_out_split_is_fixed_stratified_and_standardized_on_train():
    task = get_task("digits-softmax")
    X, y = task.train_data()
    Xt, yt = task.test_data()
    assert len(X) + len(Xt) == 1797 and len(Xt) == pytest.approx(0.25 * 1797, abs=10)
    assert X.dtype == np.float32 and not X.flags.writeable
    # stratified: every class in the test set, in proportion
    assert set(np.unique(yt)) == set(range(10))
    assert np.abs(np.bincount(yt) / len(yt) - np.bincount(y) / len(y)).max() < 0.01
    # standardized with train statistics: train columns have mean 0, std 1 or are constant 0
    assert np.abs(X.mean(axis=0)).max() < 1e-5
    std = X.std(axis=0)
    assert np.all((np.abs(std - 1) < 1e-4) | (std == 0))
    # no sample is in both splits
    rows = {r.tobytes() for r in X}
    assert sum(r.tobytes() in rows for r in Xt) < 20  # digits has a few duplicate images
    # the same split from a fresh load
    again = tasks_mod.load_dataset.__wrapped__("digits")
    np.testing.assert_array_equal(again.y_test, yt)


def test_evaluate_reports_loss_and_accuracy():
    task = get_task("breast-cancer-logreg")
    m = task.evaluate(task.init_params(0), *task.test_data())
    assert set(m) == {"loss", "accuracy"} and 0 <= m["accuracy"] <= 1
    assert m["loss"] == pytest.approx(np.log(2), abs=0.05)  # near-zero init


def test_bundled_datasets_read_as_sklearn_reads_them_without_importing_it():
    # the daemon reads scikit-learn's data files itself (importing sklearn and scipy costs
    # every daemon ~1.5 s of CPU per job start); the arrays must be the very same
    skd = pytest.importorskip("sklearn.datasets")
    for ours, theirs in ((tasks_mod._bundled_csv("digits.csv.gz"), skd.load_digits()),
                         (tasks_mod._bundled_csv("breast_cancer.csv", header_lines=1),
                          skd.load_breast_cancer())):
        X, y = ours
        assert X.dtype == np.float64 and np.array_equal(X, theirs.data)
        assert np.array_equal(y, theirs.target)


def test_missing_sklearn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # what find_spec sees when it is absent
    with pytest.raises(DatasetsUnavailable, match=r"lattice-p2p\[datasets\]"):
        tasks_mod.load_dataset.__wrapped__("digits")


def test_unknown_task_and_bad_options_are_task_errors():
    with pytest.raises(TaskError, match="unknown task"):
        get_task("nope")
    with pytest.raises(TaskError, match="bad options"):
        get_task("digits-mlp", width=3)
    with pytest.raises(TaskError, match="activation"):
        get_task("digits-mlp", activation="gelu")


class _FakeEntryPoint:
    def __init__(self, name, obj):
        self.name, self._obj, self.loaded = name, obj, False

    def load(self):
        self.loaded = True
        return self._obj


def test_plugins_load_only_when_allowed(monkeypatch):
    def factory(**options):
        return tasks_mod.SoftmaxRegression("toy", "digits", 64, 10, **options)

    ep = _FakeEntryPoint("toy", factory)
    shadow = _FakeEntryPoint("digits-mlp", lambda: None)
    monkeypatch.setattr(tasks_mod, "_entry_points", lambda group: [ep, shadow])
    with pytest.raises(TaskError, match="allowed plugins"):
        get_task("toy")
    assert not ep.loaded  # a job naming it is not enough to import anything
    task = get_task("toy", allowed_plugins=["toy"], l2=0.5)
    assert isinstance(task, Task) and task.name == "toy" and task.l2 == 0.5
    # a plugin cannot shadow a built-in
    assert isinstance(get_task("digits-mlp", allowed_plugins=["digits-mlp"]), tasks_mod.MLPClassifier)
    assert not shadow.loaded
    with pytest.raises(TaskError, match="no installed distribution"):
        get_task("absent", allowed_plugins=["absent"])


def test_plugin_returning_a_non_task_is_refused(monkeypatch):
    monkeypatch.setattr(tasks_mod, "_entry_points", lambda group: [_FakeEntryPoint("bad", lambda: object())])
    with pytest.raises(TaskError, match="not a Task"):
        get_task("bad", allowed_plugins=("bad",))


# -- Fashion-MNIST (Debian's dataset-fashion-mnist) ---------------------------------------


@pytest.fixture(scope="module")
def fashion():
    try:
        return tasks_mod.load_dataset("fashion_mnist")
    except DatasetsUnavailable as e:
        pytest.skip(str(e))


def test_fashion_keeps_its_official_split_as_compact_pixels(fashion):
    assert fashion.X_train.shape == (60000, 784) and fashion.X_test.shape == (10000, 784)
    assert fashion.X_train.dtype == np.uint8 and not fashion.X_train.flags.writeable
    assert (np.bincount(fashion.y_train) == 6000).all() and (np.bincount(fashion.y_test) == 1000).all()
    task = get_task("fashion-mlp")
    assert task.num_params == 784 * 64 + 64 + 64 * 10 + 10 and task.n_classes == 10
    # decoded with train statistics: per-pixel mean 0, one overall standard deviation 1
    f = np.concatenate([task.features(fashion.X_train[i::10][:600], np.float64) for i in range(10)])
    assert abs(f.mean()) < 0.02 and abs(f.std() - 1) < 0.02
    total = sum(task.features(fashion.X_train[i:i + 10000], np.float64).sum(axis=0) for i in range(0, 60000, 10000))
    assert np.abs(total / 60000).max() < 1e-4
    # float rows are features already: the gradient check path is unchanged
    np.testing.assert_array_equal(task.features(f[:3], np.float64), f[:3])


def test_fashion_softmax_gradient_matches_central_differences(fashion):
    task = get_task("fashion-softmax")
    Xb, yb = task.features(fashion.X_train[:20], np.float64), fashion.y_train[:20]
    rng = np.random.default_rng(2)
    params = task.init_params(0).astype(np.float64) + rng.normal(0, 0.01, task.num_params)
    _, grad = task.loss_and_grad(params, Xb, yb)
    _, from_pixels = task.loss_and_grad(params, fashion.X_train[:20], yb)
    np.testing.assert_allclose(from_pixels, grad, rtol=1e-5, atol=1e-8)
    for i in rng.choice(task.num_params, size=20, replace=False):
        plus, minus = params.copy(), params.copy()
        plus[i] += 1e-6
        minus[i] -= 1e-6
        numeric = (task.loss_and_grad(plus, Xb, yb)[0] - task.loss_and_grad(minus, Xb, yb)[0]) / 2e-6
        assert grad[i] == pytest.approx(numeric, rel=1e-4, abs=1e-7)


def test_missing_fashion_data_names_the_debian_package(tmp_path):
    with pytest.raises(DatasetsUnavailable, match="apt-get install dataset-fashion-mnist"):
        tasks_mod._fashion_mnist(tmp_path)


def _idx(path, magic, dims, body):
    with gzip.open(path, "wb") as f:
        f.write(magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims) + body)
    return path


@pytest.mark.parametrize("magic,dims,body,match", [
    (2051, (2, 2, 2), bytes(8), None),
    (2049, (2, 2, 2), bytes(8), "IDX file of 3"),
    (2051, (3, 2, 2), bytes(12), "shape"),
    (2051, (2, 2, 2), bytes(7), "bytes of data"),
    (2051, (2, 2, 2), bytes(9), "bytes of data"),
])
def test_idx_files_are_checked_before_they_are_read(tmp_path, magic, dims, body, match):
    path = _idx(tmp_path / "x.gz", magic, dims, body)
    if match is None:
        assert tasks_mod.read_idx(path, (2, 2, 2)).shape == (2, 2, 2)
    else:
        with pytest.raises(TaskError, match=match):
            tasks_mod.read_idx(path, (2, 2, 2))
