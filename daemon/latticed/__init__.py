"""The latticed process: config, composition root (one trio nursery), local RPC server,
signals. Nothing in `lattice` imports this package."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lattice-p2p")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+source"
