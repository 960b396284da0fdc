"""Pure numpy learning: tasks, partitions, compression, local SGD, gossip, merging.

The learning ring. Must not import trio, libp2p or sockets, and reads no clock (a test
enforces it). The daemon's job runner and the in-process simulation compose the same
pieces:

- tasks.py       the task registry: built-in numpy models on bundled datasets, plugins
- partition.py   iid / dirichlet:ALPHA splits of the train set among participants
- schedule.py    communication schedules: after which local steps to average
- drift.py       drift correction for label skew (logit-adjust)
- compression.py codecs (none, fp16, int8, topk:R) and error-feedback memory
- optim.py       local SGD, the outer Nesterov step, LocalTrainer (checkpointable)
- gossip.py      one pairwise averaging exchange, both sides' math
- modelfile.py   model formats: safetensors (hardened reader), BF16 words, .npz, v2 manifests
- merge.py       the ten merge methods as streaming kernels; a train job's weighted average
- mergespec.py   a merge's method, inputs and parameters; mergekit YAML configs
- mergeengine.py whole models tensor by tensor: import, export, merge shares, verify
- validate.py    checks on received tensors (InvalidTensor with stable reasons)
- participant.py one participant of a train job (from the one TrainSpec): what daemons run
- simulate.py    a whole train job in process, and the centralized baseline
"""

from lattice.learn.compression import CompressionSpecError as CompressionSpecError
from lattice.learn.compression import ErrorFeedback as ErrorFeedback
from lattice.learn.compression import get_codec as get_codec
from lattice.learn.drift import CorrectionSpecError as CorrectionSpecError
from lattice.learn.gossip import ParamChannel as ParamChannel
from lattice.learn.gossip import exchange_in_process as exchange_in_process
from lattice.learn.gossip import pair_average as pair_average
from lattice.learn.gossip import pair_weights as pair_weights
from lattice.learn.merge import MergeInputError as MergeInputError
from lattice.learn.merge import ModelFormatError as ModelFormatError
from lattice.learn.merge import canonical_model_bytes as canonical_model_bytes
from lattice.learn.merge import dare as dare
from lattice.learn.merge import linear as linear
from lattice.learn.merge import load_npz as load_npz
from lattice.learn.merge import load_safetensors as load_safetensors
from lattice.learn.merge import loads_safetensors as loads_safetensors
from lattice.learn.merge import merge_models as merge_models
from lattice.learn.merge import model_id as model_id
from lattice.learn.merge import save_npz as save_npz
from lattice.learn.merge import save_safetensors as save_safetensors
from lattice.learn.merge import slerp as slerp
from lattice.learn.merge import task_arithmetic as task_arithmetic
from lattice.learn.merge import ties as ties
from lattice.learn.merge import weighted_average as weighted_average
from lattice.learn.mergespec import MergeSpec as MergeSpec
from lattice.learn.mergespec import MergeSpecError as MergeSpecError
from lattice.learn.modelfile import BFLOAT16 as BFLOAT16
from lattice.learn.optim import LocalTrainer as LocalTrainer
from lattice.learn.optim import OuterNesterov as OuterNesterov
from lattice.learn.optim import participant_rng as participant_rng
from lattice.learn.participant import Participant as Participant
from lattice.learn.participant import make_participant as make_participant
from lattice.learn.participant import participant_round as participant_round
from lattice.learn.partition import PartitionSchemeError as PartitionSchemeError
from lattice.learn.partition import parse_scheme as parse_scheme
from lattice.learn.partition import partition as partition
from lattice.learn.schedule import ScheduleSpecError as ScheduleSpecError
from lattice.learn.schedule import parse_schedule as parse_schedule
from lattice.learn.schedule import steps_until_sync as steps_until_sync
from lattice.learn.schedule import sync_points as sync_points
from lattice.learn.simulate import centralized_baseline as centralized_baseline
from lattice.learn.simulate import simulate as simulate
from lattice.learn.tasks import DatasetsUnavailable as DatasetsUnavailable
from lattice.learn.tasks import Task as Task
from lattice.learn.tasks import TaskError as TaskError
from lattice.learn.tasks import get_task as get_task
from lattice.learn.validate import InvalidTensor as InvalidTensor
from lattice.learn.validate import NormBound as NormBound
from lattice.learn.validate import validate_tensor as validate_tensor

__all__ = [
    "BFLOAT16", "CompressionSpecError", "CorrectionSpecError", "DatasetsUnavailable", "ErrorFeedback",
    "InvalidTensor", "LocalTrainer", "MergeInputError", "MergeSpec", "MergeSpecError",
    "ModelFormatError", "NormBound", "OuterNesterov", "ParamChannel", "Participant", "PartitionSchemeError", "ScheduleSpecError",
    "Task", "TaskError",
    "canonical_model_bytes", "centralized_baseline", "dare", "exchange_in_process", "get_codec", "get_task",
    "linear", "load_npz", "load_safetensors", "loads_safetensors", "make_participant", "merge_models", "model_id", "pair_average", "pair_weights",
    "parse_schedule", "parse_scheme", "participant_rng", "participant_round", "partition", "save_npz", "save_safetensors", "simulate",
    "slerp", "steps_until_sync", "sync_points", "task_arithmetic", "ties", "validate_tensor", "weighted_average",
]
