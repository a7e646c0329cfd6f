"""Dynamic Gradient Alignment over the stream's bases, from fresh alignment batches every `every` (T_r) steps:
domain or distribution reweighting depending on the bases, with the EMA variant when beta < 1."""
from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from ..dga import ESTIMATORS, check_dga_params, dga_update
from ..state import plain
from ...core.config import setting
from ..stream import MixtureStream, TargetSampler
from .base import (AlignmentDraw, Attachment, StrategyBase, UpdateRecord, check_settings, own_rng,
                   require_positive_int, setting_error)


@dataclass(frozen=True)
class DGA:
    """Exact DGA (the paper's rule): alpha <- normalize(alpha * exp(eta * a)), then the EMA with beta."""

    eta: float = setting(0.3, "step size of the exponentiated update")
    beta: float = setting(0.1, "EMA weight of the new alpha (1: no EMA)")
    every: int = setting(20, "T_r: optimizer steps between updates")
    batch_size: int = setting(8, "sequences per basis in each alignment")
    micro_batches: int = setting(1, "alignment batches per basis (and of the target) at each update")
    target_batch_size: int | None = setting(None, "sequences of the specialized set per micro-batch (None: batch_size)")
    estimator: str = setting("exact", "exact (one backward per basis) | finite_difference | forward (forward-mode AD)")

    needs: ClassVar[frozenset[str]] = frozenset({"model"})

    def validate(self, section: str = "strategy") -> None:
        try:
            check_dga_params(self.eta, self.beta, self.every)
        except ValueError as err:
            raise ValueError(f"{section}.{err}") from None
        for name in ("batch_size", "micro_batches"):
            require_positive_int(section, name, getattr(self, name))
        if self.target_batch_size is not None:
            require_positive_int(section, "target_batch_size", self.target_batch_size)
        if self.estimator not in ESTIMATORS:
            raise setting_error(section, "estimator", self.estimator, f"one of {sorted(ESTIMATORS)}")

    def build(self, stream: MixtureStream, target: TargetSampler | None, attachment: Attachment) -> "DGAStrategy":
        self.validate()
        return DGAStrategy(stream, target=target, loss_fn=attachment.loss_fn, params=attachment.params,
                           eta=self.eta, beta=self.beta, every=self.every, batch_size=self.batch_size,
                           micro_batches=self.micro_batches, target_batch_size=self.target_batch_size,
                           estimator=self.estimator, module=attachment.model,
                           sequence_loss_fn=attachment.sequence_loss_fn)


@dataclass
class DGAStrategy(StrategyBase):
    """DGA over the stream's bases. `loss_fn(tokens)` returns the model's mean LM loss on a (n, seq_len+1) batch.

    Estimators of the alignment scores: "exact" (one backward per basis), "finite_difference" (two no-grad
    forwards at theta +- eps g) and "forward" (forward-mode AD along g; needs `module`). Given
    `sequence_loss_fn(tokens) -> (n,) losses`, the two forward estimators batch all bases together.
    """

    stream: MixtureStream
    _: KW_ONLY
    target: TargetSampler
    loss_fn: Callable[[torch.Tensor], torch.Tensor]
    params: list[torch.nn.Parameter]
    eta: float = DGA.eta
    beta: float = DGA.beta
    every: int = DGA.every
    batch_size: int = DGA.batch_size
    micro_batches: int = DGA.micro_batches
    target_batch_size: int | None = DGA.target_batch_size
    estimator: str = DGA.estimator
    module: torch.nn.Module | None = None  # the model the loss calls: needed by the "forward" estimator
    sequence_loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None

    needs: ClassVar[frozenset[str]] = DGA.needs
    # Saved with the state and checked on load: each changes the weights a run reaches (eta, beta, every, the
    # estimator) or which sequences the alignment draws from the stream and the target (the batch sizes).
    SETTINGS: ClassVar[tuple[str, ...]] = ("eta", "beta", "every", "estimator", "batch_size", "micro_batches",
                                           "target_batch_size")

    def __post_init__(self) -> None:
        check_dga_params(self.eta, self.beta, self.every)
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator = '{self.estimator}': expected one of {sorted(ESTIMATORS)}")
        if self.estimator == "forward" and self.module is None:
            raise ValueError("estimator = 'forward' needs module=<the model the loss function calls>")
        if self.target_batch_size is None:
            self.target_batch_size = self.batch_size
        self.draw = AlignmentDraw(self.stream, self.target, self.batch_size, self.micro_batches,
                                  self.target_batch_size)
        self.updates = 0
        self.skipped = 0

    def alignment_scores(self) -> np.ndarray:
        """Scores at the current parameters, on fresh batches from each basis and the specialized set
        (`AlignmentDraw`); the estimator combines the ranks' partial results into the scores of one process over
        the whole batches."""
        bases, target, shares = self.draw.draw()
        return ESTIMATORS[self.estimator](self.loss_fn, self.params, bases, target, module=self.module,
                                          sequence_loss_fn=self.sequence_loss_fn, **shares)

    def on_step(self, step: int) -> UpdateRecord | None:
        """Call after optimizer.step() of step `step` (0-based); updates the weights every `every` steps and returns
        the update's record (the caller logs it), else None."""
        if (step + 1) % self.every:
            return None
        with own_rng(self.params):
            scores = self.alignment_scores()
        new, skipped = dga_update(self.weights, scores, self.eta, self.beta)
        self.updates += 1
        self.skipped += int(skipped)
        if not skipped:
            self.stream.set_weights(new)
        return UpdateRecord(step, self.weights.tolist(), scores.tolist(), skipped)

    def state_dict(self) -> dict[str, Any]:
        # plain(): settings given as numpy scalars are saved as Python ones, which torch.load's default reads.
        return plain({"updates": self.updates, "skipped": self.skipped, "target": self.target.state_dict(),
                      **self.settings()})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters and target position (the stream restores the weights); refused when the state was
        saved under other settings."""
        check_settings(self, state, "DGA")
        self.updates, self.skipped = int(state["updates"]), int(state["skipped"])
        self.target.load_state_dict(state["target"])
