"""The local RPC contract in Python terms: method table, error codes, framing.

Pure (no trio, no sockets): the daemon's server and both clients use these.
"""

from lattice.api.errors import ErrorCode as ErrorCode
from lattice.api.errors import LatticeError as LatticeError
from lattice.api.methods import METHODS as METHODS
from lattice.api.methods import Method as Method
from lattice.api.methods import Param as Param
