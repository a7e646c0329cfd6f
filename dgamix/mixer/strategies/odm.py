"""Online Data Mixing (Albalak et al. 2023): the EXP3 bandit over disjoint domains, rewarded by each domain's
training loss; the online peer of DGA."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..state import array, plain
from ..stream import MixtureStream, TargetSampler
from .base import Attachment, Evidence, StrategyBase, as_numpy


def exp3_probabilities(cumulative_rewards: np.ndarray, step: int) -> tuple[np.ndarray, float]:
    """EXP3 policy of Online Data Mixing (Albalak et al. 2023): pi = (1 - K eps) softmax(eps R) + eps, with the
    decaying exploration rate eps_t = min(1/K, sqrt(ln K / (K t)))."""
    k = len(cumulative_rewards)
    eps = min(1.0 / k, float(np.sqrt(np.log(k) / (k * max(step, 1)))))
    logits = eps * np.asarray(cumulative_rewards, dtype=np.float64)
    soft = np.exp(logits - logits.max())
    soft /= soft.sum()
    return (1 - k * eps) * soft + eps, eps


@dataclass(frozen=True)
class ODM:
    """Online Data Mixing: EXP3 over disjoint domains (identity or coarse bases); no settings."""

    needs: ClassVar[frozenset[str]] = frozenset({"sequence_losses"})

    def validate(self, section: str = "strategy") -> None:
        return None

    def build(self, stream: MixtureStream, target: TargetSampler | None, attachment: Attachment) -> "ODMStrategy":
        return ODMStrategy(stream)


class ODMStrategy(StrategyBase):
    """Online Data Mixing (EXP3 bandit), the online peer: each domain's reward is its training loss, importance
    weighted by the probability it was drawn with. The loop calls `observe(Evidence(batch, sequence_losses))` after
    each backward, then `on_step(step)`. Bases must be domains: each cluster belongs to one basis (identity or
    coarse bases)."""

    needs: ClassVar[frozenset[str]] = ODM.needs

    def __init__(self, stream: MixtureStream):
        bases = stream.mixture.bases.tocsc()
        owners = np.full(bases.shape[1], -1)
        for cluster in range(bases.shape[1]):
            column = bases.getcol(cluster)
            if column.nnz > 1:
                raise ValueError(f"cluster {cluster} belongs to {column.nnz} bases: ODM needs disjoint domains "
                                 "(identity or coarse bases)")
            if column.nnz:
                owners[cluster] = column.indices[0]
        self.stream, self.owner = stream, owners
        self.rewards = np.zeros(stream.mixture.n_bases)
        self.steps = 0
        stream.set_weights(exp3_probabilities(self.rewards, 1)[0])

    def observe(self, evidence: Evidence) -> None:
        if evidence.sequence_losses is None:
            raise ValueError("ODM is rewarded by each sequence's training loss: observe() needs sequence_losses "
                             "(the (n,) per-sequence losses of the batch just backpropagated)")
        clusters = as_numpy(evidence.batch["cluster"])
        losses = evidence.sequence_losses
        if isinstance(losses, torch.Tensor):
            losses = losses.detach().float()
        losses = as_numpy(losses).astype(np.float64)
        if losses.shape != clusters.shape:
            raise ValueError(f"sequence_losses have shape {losses.shape}, expected {clusters.shape}: one loss per "
                             "sequence of the batch")
        domains = self.owner[clusters]
        policy = self.stream.weights
        for domain in np.unique(domains):
            if domain >= 0:
                self.rewards[domain] += losses[domains == domain].mean() / policy[domain]

    def on_step(self, step: int) -> None:  # the policy moves at every step; no scores to record
        self.steps = step + 1
        self.stream.set_weights(exp3_probabilities(self.rewards, self.steps + 1)[0])

    def state_dict(self) -> dict[str, Any]:
        return plain({"rewards": self.rewards, "steps": self.steps})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rewards = array(state["rewards"], np.float64)
        self.steps = int(state["steps"])
