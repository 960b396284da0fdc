"""The volunteer resource governor, pure: settings, schedule windows, the decision
from signals to "compute may run" (and why not), the CPU duty cycle and transfer rate
token bucket, the monthly data allowance, the CPU load meter, memory and disk checks.

The public face of `lattice.core.governor` (modules behind it are private). Must not
import trio, libp2p, sockets or read the clock: time and signals are passed in. The
daemon's sources, CPU controls and trio service are `latticed.governor`.
"""

from lattice.core.governor.budgets import CpuSample as CpuSample
from lattice.core.governor.budgets import DataAllowance as DataAllowance
from lattice.core.governor.budgets import LoadMeter as LoadMeter
from lattice.core.governor.budgets import MemoryBudget as MemoryBudget
from lattice.core.governor.budgets import TokenBucket as TokenBucket
from lattice.core.governor.budgets import disk_refusal as disk_refusal
from lattice.core.governor.budgets import format_bytes as format_bytes
from lattice.core.governor.localtime import Now as Now
from lattice.core.governor.localtime import next_period_start as next_period_start
from lattice.core.governor.policy import BATTERY as BATTERY
from lattice.core.governor.policy import BUSY as BUSY
from lattice.core.governor.policy import COMPUTE_REASONS as COMPUTE_REASONS
from lattice.core.governor.policy import DATA_CAP as DATA_CAP
from lattice.core.governor.policy import NETWORK_REASONS as NETWORK_REASONS
from lattice.core.governor.policy import NETWORK_SCHEDULE as NETWORK_SCHEDULE
from lattice.core.governor.policy import SCHEDULE as SCHEDULE
from lattice.core.governor.policy import USER as USER
from lattice.core.governor.policy import USER_ACTIVE as USER_ACTIVE
from lattice.core.governor.policy import GovernorState as GovernorState
from lattice.core.governor.policy import Reason as Reason
from lattice.core.governor.policy import Signals as Signals
from lattice.core.governor.policy import UserPause as UserPause
from lattice.core.governor.policy import VolunteerConfig as VolunteerConfig
from lattice.core.governor.policy import VolunteerConfigError as VolunteerConfigError
from lattice.core.governor.policy import decide as decide
from lattice.core.governor.schedule import Schedule as Schedule
from lattice.core.governor.schedule import ScheduleError as ScheduleError
from lattice.core.governor.schedule import parse_schedule as parse_schedule

__all__ = [
    "CpuSample", "DataAllowance", "LoadMeter", "MemoryBudget", "TokenBucket", "disk_refusal",
    "format_bytes", "Now", "next_period_start", "BATTERY", "BUSY", "COMPUTE_REASONS",
    "DATA_CAP", "NETWORK_REASONS", "NETWORK_SCHEDULE", "SCHEDULE", "USER", "USER_ACTIVE",
    "GovernorState", "Reason", "Signals", "UserPause", "VolunteerConfig",
    "VolunteerConfigError", "decide",
    "Schedule", "ScheduleError", "parse_schedule",
]
