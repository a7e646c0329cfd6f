"""Dynamic Gradient Alignment over the stream's bases, from fresh alignment batches every `every` (T_r) steps:
domain or distribution reweighting depending on the bases, with the EMA variant when beta < 1."""
from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from ..distributed import rank_and_world_size
from ..dga import (ESTIMATORS, anchored_weights, average_scores, averaged_variance, check_dga_params, dga_update,
                   relative_gains, shrink, split_alignment, SplitAlignment)
from ..state import array, plain
from ...core.config import setting
from ..stream import MixtureStream, TargetSampler
from .base import (AlignmentDraw, Attachment, StrategyBase, UpdateRecord, check_rule_settings, check_settings, own_rng,
                   require_positive_int, setting_error, trainable_parameters)


@dataclass(frozen=True)
class DGA:
    """Exact DGA: fresh alignment batches of every basis and of the specialized set every `every` steps.
    Anchored rule (default): alpha = softmax(log alpha_0 + eta * kappa * s_bar), s_bar the beta-average of the
    relative gains and kappa its shrinkage by the averaged standard error (README, "The update rule"). Paper's
    rule: alpha <- normalize(alpha * exp(eta * a)), then the EMA of alpha with beta."""

    rule: str = setting("anchored", "anchored (softmax(log alpha_0 + eta * relative gains)) | paper (compounding)")
    eta: float = setting(4.0, "anchored: log-odds per unit of relative gain; paper: step size of the update")
    beta: float = setting(0.1, "weight of the new scores in their average (anchored) or of the new alpha (paper)")
    every: int = setting(20, "T_r: optimizer steps between updates")
    batch_size: int = setting(8, "sequences per basis in each alignment")
    micro_batches: int = setting(1, "alignment batches per basis (and of the target) at each update")
    target_batch_size: int | None = setting(None, "sequences of the specialized set per micro-batch (None: batch_size)")
    estimator: str = setting("exact", "exact (one backward per basis) | finite_difference | forward (forward-mode AD)")
    kl_cap: float | None = setting(None, "anchored: at most this KL(alpha || alpha_0) in nats (None: no cap)")
    tau: float = setting(0.25, "anchored: prior scale of a relative gain; noisier averages shrink toward 0")

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
        check_rule_settings(section, self.rule, self.kl_cap, self.tau)

    def build(self, stream: MixtureStream, target: TargetSampler | None, attachment: Attachment) -> "DGAStrategy":
        self.validate()
        return DGAStrategy(stream, target=target, loss_fn=attachment.loss_fn, params=attachment.params,
                           eta=self.eta, beta=self.beta, every=self.every, batch_size=self.batch_size,
                           micro_batches=self.micro_batches, target_batch_size=self.target_batch_size,
                           estimator=self.estimator, module=attachment.model,
                           sequence_loss_fn=attachment.sequence_loss_fn, rule=self.rule, kl_cap=self.kl_cap,
                           tau=self.tau)


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
    tau: float = DGA.tau

    needs: ClassVar[frozenset[str]] = DGA.needs
    # Saved with the state and checked on load: each changes the weights a run reaches (eta, beta, every, the
    # estimator) or which sequences the alignment draws from the stream and the target (the batch sizes).
    SETTINGS: ClassVar[tuple[str, ...]] = ("eta", "beta", "every", "estimator", "batch_size", "micro_batches",
                                           "target_batch_size", "rule", "kl_cap", "tau")

    def __post_init__(self) -> None:
        self.params = trainable_parameters(self.params, "DGAStrategy")
        check_dga_params(self.eta, self.beta, self.every)
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator = '{self.estimator}': expected one of {sorted(ESTIMATORS)}")
        if self.estimator == "forward" and self.module is None:
            raise ValueError("estimator = 'forward' needs module=<the model the loss function calls>")
        if self.target_batch_size is None:
            self.target_batch_size = self.batch_size
        check_rule_settings("strategy", self.rule, self.kl_cap, self.tau)
        world = rank_and_world_size()[1]
        if self.rule == "anchored" and min(self.batch_size, self.target_batch_size) < 2 * world:
            raise ValueError(f"batch_size = {self.batch_size}, target_batch_size = {self.target_batch_size} with "
                             f"world size {world}: the anchored rule cuts every rank's share of each alignment "
                             f"batch in two halves (for ||g_spe||^2 and the scores' standard errors); expected both "
                             f">= {2 * world} (2 x the world size)")
        self.draw = AlignmentDraw(self.stream, self.target, self.batch_size, self.micro_batches,
                                  self.target_batch_size)
        self.updates = 0
        self.skipped = 0
        # The anchored rule's anchor (the weights when the strategy starts), the average of its relative gains and
        # that average's variance (what the shrinkage weighs it against).
        self.prior = self.stream.weights
        self.score_average: np.ndarray | None = None
        self.score_variance: np.ndarray | None = None

    def alignment_scores(self) -> np.ndarray:
        """a_j at the current parameters, on fresh batches from each basis and the specialized set
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
        if self.rule == "anchored":
            scores, skipped = self._anchored_update()
        else:
            with own_rng(self.params):
                scores = self.alignment_scores()
            new, skipped = dga_update(self.weights, scores, self.eta, self.beta)
            if not skipped:
                self.stream.set_weights(new)
        self.updates += 1
        self.skipped += int(skipped)
        return UpdateRecord(step, self.weights.tolist(), scores.tolist(), skipped)

    def _anchored_update(self) -> tuple[np.ndarray, bool]:
        with own_rng(self.params):
            bases, target, shares = self.draw.draw()
            measured = split_alignment(self.estimator, self.loss_fn, self.params, bases, target, self.weights,
                                       module=self.module, sequence_loss_fn=self.sequence_loss_fn, **shares)
        return self.absorb(measured)

    def absorb(self, measured: SplitAlignment) -> tuple[np.ndarray, bool]:
        """The anchored rule's update from one measurement: average the relative gains and their variance over
        updates, shrink, move the weights. Returns (the shrunk averaged scores that set the weights, skipped).
        Separate from the measurement so that tests can replay it on alignments of known distribution."""
        gains = relative_gains(measured.alignments, self.weights, measured.gain)
        if not (np.isfinite(gains).all() and np.isfinite(measured.standard_errors).all()):
            return gains, True  # G <= 0 (the target batch's halves disagree: no unit to score in), or a NaN
        self.score_average = average_scores(self.score_average, gains, self.beta)
        self.score_variance = averaged_variance(self.score_variance, (measured.standard_errors / measured.gain) ** 2,
                                                self.beta)
        scores = shrink(self.score_average, self.score_variance, self.tau)
        self.stream.set_weights(anchored_weights(self.prior, scores, self.eta, self.kl_cap))
        return scores, False

    def state_dict(self) -> dict[str, Any]:
        # plain(): settings given as numpy scalars are saved as Python ones, which torch.load's default reads.
        return plain({"updates": self.updates, "skipped": self.skipped, "target": self.target.state_dict(),
                      "prior": self.prior, "score_average": self.score_average,
                      "score_variance": self.score_variance, **self.settings()})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters and target position (the stream restores the weights); refused when the state was
        saved under other settings."""
        check_settings(self, state, "DGA")
        self.updates, self.skipped = int(state["updates"]), int(state["skipped"])
        self.target.load_state_dict(state["target"])
        self.prior = array(state["prior"], np.float64)
        average, variance = state["score_average"], state.get("score_variance")
        self.score_average = None if average is None else array(average, np.float64)
        self.score_variance = None if variance is None else array(variance, np.float64)
