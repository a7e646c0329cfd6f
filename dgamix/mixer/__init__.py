"""dgamix online side: the Mixer a training loop holds, and the parts it is made of (the cluster store, the bases,
the resumable mixture stream and its loader, the strategies)."""
from ..core.errors import StateMismatchError
from .loader import MixtureLoader
from .mixer import Mixer
from .mixture import Mixture, check_weights
from .store import ClusterStore
from .strategies import DGA, ODM, DoGE, Evidence, InBatchDGA, Static, UpdateRecord
from .stream import MixtureStream, StepLog, StreamExhausted, TargetSampler

__all__ = ["ClusterStore", "DGA", "DoGE", "Evidence", "InBatchDGA", "Mixer", "Mixture", "MixtureLoader",
           "MixtureStream", "ODM", "StateMismatchError", "Static", "StepLog", "StreamExhausted", "TargetSampler",
           "UpdateRecord", "check_weights"]
