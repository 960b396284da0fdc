"""Training tasks: a model, its loss with an analytic gradient, and its data.

Owns the task registry (`get_task`), the built-in numpy tasks, the loading of their
datasets and of plugin tasks. Pure numpy: must not import trio, libp2p or sockets, and
reads no clock. scikit-learn is an optional extra used only for its bundled datasets
(digits, breast cancer); it is imported lazily, when such a task's data is first
needed. Fashion-MNIST (Xiao et al. 2017) is read with numpy from Debian's
`dataset-fashion-mnist` package (its IDX files in /usr/share/datasets/fashion-mnist).

Parameters are always ONE flat float32 vector. Each task documents its layout (the
order, names and shapes of the blocks inside that vector) in `Task.layout`, and
`Task.unflatten` returns named views into it, e.g. to save a model as named tensors.

Data: the scikit-learn datasets use a fixed, deterministic, stratified held-out test
split (25 % of each class, chosen by a fixed seed that does not depend on the job), and
features standardized with the mean and standard deviation of the *train* split only.
Fashion-MNIST keeps its official split (60,000 train / 10,000 test) and is stored as
the raw uint8 pixels (47 MB instead of 188 MB of float32): a task decodes a batch to
standardized features (per-pixel train mean, one train standard deviation) when it
uses it (`Task.features`). So every daemon, whatever its job, sees the same train and
test sets.

Plugins: a third-party distribution may declare tasks in the entry-point group
`lattice.tasks` (name -> a `Task` subclass or a factory returning a `Task`). A plugin
is loaded only when its name is listed in `allowed_plugins` (the volunteer's config),
never because a job received from the network names it. Built-in names cannot be
shadowed by a plugin.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import importlib.metadata

ENTRY_POINT_GROUP = "lattice.tasks"
TEST_FRACTION = 0.25
SPLIT_SEED = 20240611  # fixed forever: changing it changes every task's test set
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian: dataset-fashion-mnist
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"

__all__ = [
    "ENTRY_POINT_GROUP",
    "Dataset",
    "DatasetsUnavailable",
    "LogisticRegression",
    "MLPClassifier",
    "PixelEncoding",
    "SoftmaxRegression",
    "Task",
    "TaskError",
    "builtin_task_names",
    "get_task",
]


class TaskError(ValueError):
    """An unknown, disallowed, uninstalled or misbuilt task, or bad task options."""


class DatasetsUnavailable(ImportError):
    """A built-in task's data is not installed: scikit-learn (the `datasets` extra) or
    Debian's `dataset-fashion-mnist`; the message names what to install."""


@dataclass(frozen=True)
class PixelEncoding:
    """How stored uint8 rows decode to features: `pixels * scale - shift`."""

    scale: float
    shift: np.ndarray  # float32 (n_features,)

    def decode(self, X: np.ndarray, dtype: np.dtype) -> np.ndarray:
        decoded: np.ndarray = X.astype(dtype) * dtype.type(self.scale) - self.shift.astype(dtype, copy=False)
        return decoded


@dataclass(frozen=True)
class Dataset:
    """A train/test split of standardized features. Arrays are read-only and shared.

    X arrays are float32 features, or uint8 pixels when `encoding` is set (decoded by
    `Task.features`)."""

    X_train: np.ndarray  # float32 or uint8 (n_train, n_features)
    y_train: np.ndarray  # int64 (n_train,)
    X_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    encoding: PixelEncoding | None = None


def _bundled_data(filename: str) -> Path:
    """A data file scikit-learn ships, found without importing scikit-learn: the import
    (scipy with it) costs a daemon ~1.5 s of CPU at the start of every job's first round,
    more than a 100-step digits job's own math."""
    spec = importlib.util.find_spec("sklearn")
    places = list(spec.submodule_search_locations or []) if spec is not None else []
    for place in places:
        path = Path(place) / "datasets" / "data" / filename
        if path.is_file():
            return path
    raise DatasetsUnavailable(
        "the built-in tasks need scikit-learn's bundled datasets: "
        "pip install 'lattice-p2p[datasets]'")


def _bundled_csv(filename: str, *, header_lines: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(features float64, labels int64) of a bundled CSV whose last column is the label,
    parsed as scikit-learn's loaders parse it (`load_digits`, `load_breast_cancer`)."""
    path = _bundled_data(filename)
    opener = gzip.open if filename.endswith(".gz") else open
    with opener(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", skiprows=header_lines, dtype=np.float64, ndmin=2)
    return table[:, :-1], table[:, -1].astype(np.int64)


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: (train_idx, test_idx), both sorted.

    Done here rather than with sklearn's train_test_split so the split cannot change
    with the scikit-learn version: daemons must agree on the test set."""
    rng = np.random.default_rng(seed)
    test_parts = []
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        n_test = int(round(len(idx) * test_fraction))
        test_parts.append(rng.permutation(idx)[:n_test])
    test_idx = np.sort(np.concatenate(test_parts))
    train_mask = np.ones(len(y), dtype=bool)
    train_mask[test_idx] = False
    return np.flatnonzero(train_mask), test_idx


def _standardized(X: np.ndarray, y: np.ndarray, n_classes: int) -> Dataset:
    train_idx, test_idx = stratified_split(y, TEST_FRACTION, SPLIT_SEED)
    X = X.astype(np.float64)
    mean = X[train_idx].mean(axis=0)
    std = X[train_idx].std(axis=0)
    std[std == 0] = 1.0  # constant features (digits' border pixels) stay 0, not NaN
    Xs = ((X - mean) / std).astype(np.float32)
    arrays = (Xs[train_idx], y[train_idx].astype(np.int64), Xs[test_idx], y[test_idx].astype(np.int64))
    for a in arrays:
        a.setflags(write=False)  # cached and shared by every task instance
    return Dataset(*arrays, n_classes=n_classes)


_IDX_MAGIC = {2049: 1, 2051: 3}  # labels: 1 dimension, images: 3 (IDX format, LeCun et al.)


def read_idx(path: Path, expected_shape: tuple[int, ...]) -> np.ndarray:
    """The uint8 array in a gzipped IDX file, which must have `expected_shape`.

    The header is checked against the expected shape before the body is read, so a
    damaged file cannot make us allocate more than that."""
    with gzip.open(path, "rb") as f:
        head = f.read(4)
        magic = int.from_bytes(head, "big") if len(head) == 4 else -1
        ndim = _IDX_MAGIC.get(magic)
        if ndim is None or ndim != len(expected_shape):
            raise TaskError(f"{path}: not an IDX file of {len(expected_shape)} dimensions")
        dims = tuple(int.from_bytes(f.read(4), "big") for _ in range(ndim))
        if dims != expected_shape:
            raise TaskError(f"{path}: shape {dims}, expected {expected_shape}")
        body = f.read(int(np.prod(expected_shape)) + 1)
    if len(body) != int(np.prod(expected_shape)):
        raise TaskError(f"{path}: {len(body)} bytes of data, expected {int(np.prod(expected_shape))}")
    return np.frombuffer(body, dtype=np.uint8).reshape(expected_shape)


def _fashion_mnist(directory: Path) -> Dataset:
    files = {
        "X_train": ("train-images-idx3-ubyte.gz", (60000, 28, 28)),
        "y_train": ("train-labels-idx1-ubyte.gz", (60000,)),
        "X_test": ("t10k-images-idx3-ubyte.gz", (10000, 28, 28)),
        "y_test": ("t10k-labels-idx1-ubyte.gz", (10000,)),
    }
    missing = [name for name, _ in files.values() if not (directory / name).is_file()]
    if missing:
        raise DatasetsUnavailable(
            f"the fashion tasks need Fashion-MNIST in {directory} (missing {', '.join(missing)}): "
            f"apt-get install {FASHION_MNIST_PACKAGE}")
    raw = {key: read_idx(directory / name, shape) for key, (name, shape) in files.items()}
    X_train = raw["X_train"].reshape(60000, 784)
    X_test = raw["X_test"].reshape(10000, 784)
    for key in ("y_train", "y_test"):
        if raw[key].max() > 9:
            raise TaskError(f"{files[key][0]}: labels outside 0..9")
    # per-pixel train mean, one train std for all pixels: per-pixel stds would blow up
    # the near-constant border pixels
    total, squares = np.zeros(784), np.zeros(784)
    for start in range(0, 60000, 6000):  # in chunks: no 60000 x 784 float temporary
        chunk = X_train[start : start + 6000].astype(np.float64)
        total += chunk.sum(axis=0)
        squares += (chunk * chunk).sum(axis=0)
    mean = total / 60000
    std = float(np.sqrt((squares / 60000 - mean * mean).mean()))
    shift = (mean / std).astype(np.float32)
    arrays = (X_train, raw["y_train"].astype(np.int64), X_test, raw["y_test"].astype(np.int64))
    for a in (*arrays, shift):
        a.setflags(write=False)
    return Dataset(*arrays, n_classes=10, encoding=PixelEncoding(1.0 / std, shift))


@functools.cache
def load_dataset(name: str) -> Dataset:
    """The dataset `digits`, `breast_cancer` (split and standardized here) or
    `fashion_mnist` (its official split)."""
    if name == "fashion_mnist":
        return _fashion_mnist(FASHION_MNIST_DIR)
    if name == "digits":
        return _standardized(*_bundled_csv("digits.csv.gz"), 10)
    if name == "breast_cancer":  # its first line: "569,30,malignant,benign"
        return _standardized(*_bundled_csv("breast_cancer.csv", header_lines=1), 2)
    raise TaskError(f"unknown bundled dataset {name!r}")


class Task(ABC):
    """A model over one flat float32 parameter vector, with its data.

    Subclasses set `name`, `layout` (a tuple of (block name, shape) in vector order)
    and implement `loss_and_grad`, `predict_scores` and `_dataset`. Computations run in
    the dtype of `params`: float32 in production, float64 accepted for gradient checks.
    """

    name: str
    layout: tuple[tuple[str, tuple[int, ...]], ...]
    n_classes: int | None = None
    """Set by softmax classifiers, whose `loss_and_grad` then also takes `logit_offset`
    (a (n_classes,) vector added to the logits in training only: drift.py)."""

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(shape)) for _, shape in self.layout)

    def unflatten(self, params: np.ndarray) -> dict[str, np.ndarray]:
        """Named views (no copies) of the blocks of `params`, in layout order."""
        if params.shape != (self.num_params,):
            raise ValueError(f"{self.name}: params shape {params.shape}, expected ({self.num_params},)")
        out, offset = {}, 0
        for block, shape in self.layout:
            size = int(np.prod(shape))
            out[block] = params[offset : offset + size].reshape(shape)
            offset += size
        return out

    def flatten(self, blocks: Mapping[str, np.ndarray]) -> np.ndarray:
        """The inverse of `unflatten`: a new float32 vector from named blocks."""
        missing = [b for b, _ in self.layout if b not in blocks]
        if missing or len(blocks) != len(self.layout):
            raise ValueError(f"{self.name}: blocks {sorted(blocks)} do not match layout")
        parts = []
        for block, shape in self.layout:
            arr = np.asarray(blocks[block])
            if arr.shape != shape:
                raise ValueError(f"{self.name}: block {block} has shape {arr.shape}, expected {shape}")
            parts.append(arr.astype(np.float32).ravel())
        return np.concatenate(parts)

    def features(self, X: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """Model inputs in `dtype` from rows of this task's data: stored uint8 pixels
        are decoded (`Dataset.encoding`); float rows are taken as features already."""
        dtype = np.dtype(dtype)
        if X.dtype == np.uint8:
            encoding = self._dataset().encoding
            if encoding is None:
                raise TypeError(f"{self.name}: uint8 rows, but the dataset has no pixel encoding")
            return encoding.decode(X, dtype)
        return X.astype(dtype, copy=False)

    @abstractmethod
    def init_params(self, seed: int) -> np.ndarray:
        """A fresh float32 parameter vector, a pure function of `seed`."""

    @abstractmethod
    def loss_and_grad(self, params: np.ndarray, X: np.ndarray, y: np.ndarray,
                      logit_offset: np.ndarray | None = None) -> tuple[float, np.ndarray]:
        """Mean loss over the batch and its gradient (same shape and dtype as params);
        ``logit_offset`` (softmax tasks only) is added to the logits first."""

    @abstractmethod
    def predict_scores(self, params: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(raw scores: logits or margins, predicted integer labels)."""

    @abstractmethod
    def _dataset(self) -> Dataset: ...

    @abstractmethod
    def _losses(self, params: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per-sample loss (no regularization)."""

    def evaluate(self, params: np.ndarray, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """{"loss": mean data loss, "accuracy": fraction in [0, 1]}."""
        _, labels = self.predict_scores(params, X)
        return {
            "loss": float(np.mean(self._losses(params, X, y))),
            "accuracy": float(np.mean(labels == y)),
        }

    def train_data(self) -> tuple[np.ndarray, np.ndarray]:
        ds = self._dataset()
        return ds.X_train, ds.y_train

    def test_data(self) -> tuple[np.ndarray, np.ndarray]:
        ds = self._dataset()
        return ds.X_test, ds.y_test

    def describe(self) -> dict[str, Any]:
        """Plain data for job specs and model metadata."""
        return {"name": self.name, "num_params": self.num_params, "layout": [[b, list(s)] for b, s in self.layout]}


def _softmax_ce(logits: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample cross-entropy and d(mean loss)/d(logits)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    sums = exp.sum(axis=1, keepdims=True)
    rows = np.arange(len(y))
    losses = np.log(sums[:, 0]) - shifted[rows, y]
    dlogits = exp / sums
    dlogits[rows, y] -= 1
    return losses, dlogits / len(y)


class SoftmaxRegression(Task):
    """Multinomial logistic regression. Layout: W (d, k) row-major, then b (k,)."""

    def __init__(self, name: str, dataset: str, n_features: int, n_classes: int, l2: float = 0.0):
        self.name, self._dataset_name, self.l2 = name, dataset, float(l2)
        self.n_classes = n_classes
        self.layout = (("W", (n_features, n_classes)), ("b", (n_classes,)))

    def _dataset(self) -> Dataset:
        return load_dataset(self._dataset_name)

    def init_params(self, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        d, k = self.layout[0][1]
        p = np.zeros(self.num_params, dtype=np.float32)
        p[: d * k] = rng.normal(0.0, 0.01, d * k)
        return p

    def _logits(self, params: np.ndarray, X: np.ndarray) -> np.ndarray:
        blocks = self.unflatten(params)
        logits: np.ndarray = self.features(X, params.dtype) @ blocks["W"] + blocks["b"]
        return logits

    def _losses(self, params: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        return _softmax_ce(self._logits(params, X), y)[0]

    def predict_scores(self, params: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits = self._logits(params, X)
        return logits, logits.argmax(axis=1)

    def loss_and_grad(self, params: np.ndarray, X: np.ndarray, y: np.ndarray,
                      logit_offset: np.ndarray | None = None) -> tuple[float, np.ndarray]:
        X = self.features(X, params.dtype)
        blocks = self.unflatten(params)
        logits = X @ blocks["W"] + blocks["b"]
        losses, dlogits = _softmax_ce(logits if logit_offset is None else logits + logit_offset, y)
        grad = np.empty_like(params)
        g = self.unflatten(grad)
        g["W"][...] = X.T @ dlogits
        g["b"][...] = dlogits.sum(axis=0)
        loss = float(losses.mean())
        if self.l2:
            loss += 0.5 * self.l2 * float(np.dot(blocks["W"].ravel(), blocks["W"].ravel()))
            g["W"] += self.l2 * blocks["W"]
        return loss, grad


class MLPClassifier(Task):
    """One hidden layer, softmax cross-entropy.

    Layout: W1 (d, h), b1 (h,), W2 (h, k), b2 (k,), each row-major, in that order.
    """

    def __init__(
        self,
        name: str,
        dataset: str,
        n_features: int,
        n_classes: int,
        hidden: int = 64,
        activation: str = "relu",
        l2: float = 0.0,
    ):
        if activation not in ("relu", "tanh"):
            raise TaskError(f"{name}: activation must be 'relu' or 'tanh', got {activation!r}")
        if not isinstance(hidden, int) or not 1 <= hidden <= 65536:
            raise TaskError(f"{name}: hidden must be an int in [1, 65536], got {hidden!r}")
        self.name, self._dataset_name = name, dataset
        self.hidden, self.activation, self.l2 = hidden, activation, float(l2)
        self.n_classes = n_classes
        self.layout = (
            ("W1", (n_features, hidden)),
            ("b1", (hidden,)),
            ("W2", (hidden, n_classes)),
            ("b2", (n_classes,)),
        )

    def _dataset(self) -> Dataset:
        return load_dataset(self._dataset_name)

    def init_params(self, seed: int) -> np.ndarray:
        # He init for ReLU, Glorot for tanh; biases zero.
        rng = np.random.default_rng(seed)
        p = np.zeros(self.num_params, dtype=np.float32)
        b = self.unflatten(p)
        d, h = b["W1"].shape
        k = b["W2"].shape[1]
        if self.activation == "relu":
            b["W1"][...] = rng.normal(0.0, np.sqrt(2.0 / d), (d, h))
        else:
            b["W1"][...] = rng.normal(0.0, np.sqrt(2.0 / (d + h)), (d, h))
        b["W2"][...] = rng.normal(0.0, np.sqrt(2.0 / (h + k)), (h, k))
        return p

    def _forward(
            self, params: np.ndarray, X: np.ndarray
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        blocks = self.unflatten(params)
        X = self.features(X, params.dtype)
        pre = X @ blocks["W1"] + blocks["b1"]
        hid = np.maximum(pre, 0) if self.activation == "relu" else np.tanh(pre)
        return blocks, X, pre, hid, hid @ blocks["W2"] + blocks["b2"]

    def _losses(self, params: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        return _softmax_ce(self._forward(params, X)[-1], y)[0]

    def predict_scores(self, params: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits = self._forward(params, X)[-1]
        return logits, logits.argmax(axis=1)

    def loss_and_grad(self, params: np.ndarray, X: np.ndarray, y: np.ndarray,
                      logit_offset: np.ndarray | None = None) -> tuple[float, np.ndarray]:
        blocks, X, pre, hid, logits = self._forward(params, X)
        losses, dlogits = _softmax_ce(logits if logit_offset is None else logits + logit_offset, y)
        grad = np.empty_like(params)
        g = self.unflatten(grad)
        g["W2"][...] = hid.T @ dlogits
        g["b2"][...] = dlogits.sum(axis=0)
        dhid = dlogits @ blocks["W2"].T
        if self.activation == "relu":
            dpre = dhid * (pre > 0)
        else:
            dpre = dhid * (1 - hid * hid)
        g["W1"][...] = X.T @ dpre
        g["b1"][...] = dpre.sum(axis=0)
        loss = float(losses.mean())
        if self.l2:
            for w in ("W1", "W2"):
                loss += 0.5 * self.l2 * float(np.dot(blocks[w].ravel(), blocks[w].ravel()))
                g[w] += self.l2 * blocks[w]
        return loss, grad


class LogisticRegression(Task):
    """Binary logistic regression (labels 0/1). Layout: w (d,), then b (1,)."""

    def __init__(self, name: str, dataset: str, n_features: int, l2: float = 0.0):
        self.name, self._dataset_name, self.l2 = name, dataset, float(l2)
        self.layout = (("w", (n_features,)), ("b", (1,)))

    def _dataset(self) -> Dataset:
        return load_dataset(self._dataset_name)

    def init_params(self, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        p = np.zeros(self.num_params, dtype=np.float32)
        p[:-1] = rng.normal(0.0, 0.01, self.num_params - 1)
        return p

    def _margin(self, params: np.ndarray, X: np.ndarray) -> np.ndarray:
        blocks = self.unflatten(params)
        margin: np.ndarray = self.features(X, params.dtype) @ blocks["w"] + blocks["b"][0]
        return margin

    def _losses(self, params: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        z = self._margin(params, X)
        # log(1 + exp(-s z)) with s = 2y - 1, computed stably
        losses: np.ndarray = np.logaddexp(0, -(2 * y - 1) * z)
        return losses

    def predict_scores(self, params: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = self._margin(params, X)
        return z, (z > 0).astype(np.int64)

    def loss_and_grad(self, params: np.ndarray, X: np.ndarray, y: np.ndarray,
                      logit_offset: np.ndarray | None = None) -> tuple[float, np.ndarray]:
        if logit_offset is not None:
            raise TaskError(f"{self.name}: logit adjustment needs a softmax task")
        X = self.features(X, params.dtype)
        blocks = self.unflatten(params)
        z = X @ blocks["w"] + blocks["b"][0]
        s = (2 * y - 1).astype(params.dtype)
        losses = np.logaddexp(0, -s * z)
        # d/dz log(1+exp(-s z)) = -s * sigmoid(-s z); sigmoid via tanh is overflow-free
        dz = -s * (0.5 * (1 + np.tanh(-0.5 * s * z))) / len(y)
        grad = np.empty_like(params)
        g = self.unflatten(grad)
        g["w"][...] = X.T @ dz
        g["b"][...] = dz.sum()
        loss = float(losses.mean())
        if self.l2:
            loss += 0.5 * self.l2 * float(np.dot(blocks["w"], blocks["w"]))
            g["w"] += self.l2 * blocks["w"]
        return loss, grad


TaskFactory = Callable[..., Task]

_BUILTINS: dict[str, TaskFactory] = {
    "digits-softmax": functools.partial(SoftmaxRegression, "digits-softmax", "digits", 64, 10),
    "digits-mlp": functools.partial(MLPClassifier, "digits-mlp", "digits", 64, 10),
    "breast-cancer-logreg": functools.partial(LogisticRegression, "breast-cancer-logreg", "breast_cancer", 30),
    "fashion-softmax": functools.partial(SoftmaxRegression, "fashion-softmax", "fashion_mnist", 784, 10),
    "fashion-mlp": functools.partial(MLPClassifier, "fashion-mlp", "fashion_mnist", 784, 10),
}


def builtin_task_names() -> list[str]:
    return sorted(_BUILTINS)


def _entry_points(group: str) -> Iterable[importlib.metadata.EntryPoint]:
    # one seam for tests to substitute installed distributions; imported here because
    # importlib.metadata drags in email -> socket, which the pure ring must not load
    import importlib.metadata

    return importlib.metadata.entry_points(group=group)


def _plugin_factory(name: str) -> TaskFactory:
    matches = [ep for ep in _entry_points(ENTRY_POINT_GROUP) if ep.name == name]
    if not matches:
        raise TaskError(f"task {name!r} is allowed but no installed distribution provides it "
                        f"(entry-point group {ENTRY_POINT_GROUP!r})")
    if len(matches) > 1:
        raise TaskError(f"task {name!r} is provided by {len(matches)} installed entry points; refusing to guess")
    factory: TaskFactory = matches[0].load()  # a plugin's word; get_task checks what it builds
    return factory


def get_task(name: str, allowed_plugins: Iterable[str] = (), **options: Any) -> Task:
    """The task called `name`, built with `options` (e.g. `hidden=64` for digits-mlp).

    A name that is not built in is looked up among plugins only if it appears in
    `allowed_plugins`; otherwise TaskError. Options the factory does not accept raise
    TaskError."""
    if not isinstance(name, str):
        raise TaskError(f"task name must be a string, got {type(name).__name__}")
    if name in _BUILTINS:
        factory = _BUILTINS[name]
    elif name in set(allowed_plugins):
        factory = _plugin_factory(name)
    else:
        raise TaskError(
            f"unknown task {name!r}: built-in tasks are {', '.join(builtin_task_names())}; "
            "a plugin task must be installed and listed in the config's allowed plugins"
        )
    try:
        # bind first so a TypeError raised inside a plugin's own code is not mistaken
        # for bad options
        inspect.signature(factory).bind(**options)
    except TypeError as exc:
        raise TaskError(f"task {name!r}: bad options {sorted(options)}: {exc}") from exc
    except ValueError:
        pass  # no introspectable signature (some builtins/C callables): just call it
    task = factory(**options)
    if not isinstance(task, Task):
        raise TaskError(f"task {name!r}: factory returned {type(task).__name__}, not a Task")
    return task
