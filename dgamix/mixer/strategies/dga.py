"""Dynamic Gradient Alignment over the stream's bases, from fresh alignment batches every `every` (T_r) steps:
domain or distribution reweighting depending on the bases, with the EMA variant when beta < 1."""
from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from ..distributed import rank_and_world_size
from ..dga import (ESTIMATORS, anchored_weights, average_scores, check_dga_params, dga_update, relative_gains,
                   split_half_gain)
from ..state import array, plain
from ...core.config import setting
from ..stream import MixtureStream, TargetSampler
from .base import (AlignmentDraw, Attachment, StrategyBase, UpdateRecord, check_rule_settings, check_settings,
                   own_rng, require_positive_int, setting_error)


@dataclass(frozen=True)
class DGA:
    """Exact DGA (the paper's rule): alpha <- normalize(alpha * exp(eta * a)), then the EMA with beta."""

    rule: str = setting("anchored", "anchored (softmax(log alpha_0 + eta * relative gains)) | paper (compounding)")
    eta: float = setting(4.0, "anchored: log-odds per unit of relative gain; paper: step size of the update")
    beta: float = setting(0.1, "weight of the new scores in their average (anchored) or of the new alpha (paper)")
    every: int = setting(20, "T_r: optimizer steps between updates")
    batch_size: int = setting(8, "sequences per basis in each alignment")
    micro_batches: int = setting(1, "alignment batches per basis (and of the target) at each update")
    target_batch_size: int | None = setting(None, "sequences of the specialized set per micro-batch (None: batch_size)")
    estimator: str = setting("exact", "exact (one backward per basis) | finite_difference | forward (forward-mode AD)")
    kl_cap: float | None = setting(None, "anchored: at most this KL(alpha || alpha_0) in nats (None: no cap)")

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
        check_rule_settings(section, self.rule, self.kl_cap)

    def build(self, stream: MixtureStream, target: TargetSampler | None, attachment: Attachment) -> "DGAStrategy":
        self.validate()
        return DGAStrategy(stream, target=target, loss_fn=attachment.loss_fn, params=attachment.params,
                           eta=self.eta, beta=self.beta, every=self.every, batch_size=self.batch_size,
                           micro_batches=self.micro_batches, target_batch_size=self.target_batch_size,
                           estimator=self.estimator, module=attachment.model,
                           sequence_loss_fn=attachment.sequence_loss_fn, rule=self.rule, kl_cap=self.kl_cap)


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
    rule: str = DGA.rule
    kl_cap: float | None = DGA.kl_cap

    needs: ClassVar[frozenset[str]] = DGA.needs
    # Saved with the state and checked on load: each changes the weights a run reaches (eta, beta, every, the
    # estimator) or which sequences the alignment draws from the stream and the target (the batch sizes).
    SETTINGS: ClassVar[tuple[str, ...]] = ("eta", "beta", "every", "estimator", "batch_size", "micro_batches",
                                           "target_batch_size", "rule", "kl_cap")

    def __post_init__(self) -> None:
        check_dga_params(self.eta, self.beta, self.every)
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator = '{self.estimator}': expected one of {sorted(ESTIMATORS)}")
        if self.estimator == "forward" and self.module is None:
            raise ValueError("estimator = 'forward' needs module=<the model the loss function calls>")
        if self.target_batch_size is None:
            self.target_batch_size = self.batch_size
        check_rule_settings("strategy", self.rule, self.kl_cap)
        if self.rule == "anchored" and self.target_batch_size < 2 * rank_and_world_size()[1]:
            raise ValueError(f"target_batch_size = {self.target_batch_size}: the anchored rule splits every rank's "
                             "target batch in two halves to measure ||g_spe||^2; expected >= 2 x the world size")
        self.draw = AlignmentDraw(self.stream, self.target, self.batch_size, self.micro_batches,
                                  self.target_batch_size)
        self.updates = 0
        self.skipped = 0
        # The anchored rule's anchor (the weights when the strategy starts) and the average of its scores.
        self.prior = self.stream.weights
        self.score_average: np.ndarray | None = None

    def alignment_scores(self) -> np.ndarray:
        """a_j at the current parameters, on fresh batches from each basis and the specialized set
        (`AlignmentDraw`); the estimator combines the ranks' partial results into the scores of one process over
        the whole batches."""
        return self._alignment()[0]

    def _alignment(self) -> tuple[np.ndarray, float]:
        """(a, G): the alignments and, under the anchored rule, the split-half ||g_spe||^2 of the same target
        batches (NaN under the paper's rule, which needs none)."""
        bases, target, shares = self.draw.draw()
        a = ESTIMATORS[self.estimator](self.loss_fn, self.params, bases, target, module=self.module,
                                       sequence_loss_fn=self.sequence_loss_fn, **shares)
        gain = split_half_gain(self.loss_fn, self.params, target, **shares) if self.rule == "anchored" else np.nan
        return a, gain

    def on_step(self, step: int) -> UpdateRecord | None:
        """Call after optimizer.step() of step `step` (0-based); updates the weights every `every` steps and returns
        the update's record (the caller logs it), else None."""
        if (step + 1) % self.every:
            return None
        with own_rng(self.params):
            alignments, gain = self._alignment()
        if self.rule == "anchored":
            scores = relative_gains(alignments, self.weights, gain)  # exact scores: no standard error to shrink
            skipped = not np.isfinite(scores).all()
            if not skipped:
                self.score_average = average_scores(self.score_average, scores, self.beta)
                new = anchored_weights(self.prior, self.score_average, self.eta, self.kl_cap)
        else:
            scores = alignments
            new, skipped = dga_update(self.weights, scores, self.eta, self.beta)
        self.updates += 1
        self.skipped += int(skipped)
        if not skipped:
            self.stream.set_weights(new)
        return UpdateRecord(step, self.weights.tolist(), scores.tolist(), skipped)

    def state_dict(self) -> dict[str, Any]:
        # plain(): settings given as numpy scalars are saved as Python ones, which torch.load's default reads.
        return plain({"updates": self.updates, "skipped": self.skipped, "target": self.target.state_dict(),
                      "prior": self.prior, "score_average": self.score_average, **self.settings()})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters and target position (the stream restores the weights); refused when the state was
        saved under other settings."""
        check_settings(self, state, "DGA")
        self.updates, self.skipped = int(state["updates"]), int(state["skipped"])
        self.target.load_state_dict(state["target"])
        self.prior = array(state["prior"], np.float64)
        average = state["score_average"]
        self.score_average = None if average is None else array(average, np.float64)
