"""dgamix online side: the cluster store, the mixture over bases, and the resumable mixture stream."""
from .mixture import Mixture, check_weights
from .store import ClusterStore
from .stream import MixtureStream, StateMismatchError, StepLog, TargetSampler

__all__ = ["ClusterStore", "Mixture", "MixtureStream", "StateMismatchError", "StepLog", "TargetSampler",
           "check_weights"]
