"""The DoGE baseline (Fan et al. 2024): learning-rate-scaled alignment normalized by the mean gradient norm,
clipped, no EMA, on DGA's alignment draw."""
from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from ..doge import check_doge_params, doge_update
from ..dga import exact_alignment_with_norms
from ..state import array, plain
from ...core.config import setting
from ..stream import MixtureStream, TargetSampler
from .base import AlignmentDraw, Attachment, StrategyBase, UpdateRecord, check_settings, own_rng, require_positive_int


@dataclass(frozen=True)
class DoGE:
    """DoGE's out-of-domain settings (the paper's configs) and DGA's alignment draw."""

    mu: float = setting(0.05, "Bregman coefficient: alpha <- normalize(alpha * exp(s / mu))")
    clip_min: float = setting(0.0, "scores are clipped to [lr * clip_min, lr * clip_max]")
    clip_max: float = setting(5.0, "upper clip of the scores, in units of the learning rate")
    grad_clip: float = setting(1.0, "each scoring gradient clipped to this norm first (0: not clipped)")
    every: int = setting(20, "optimizer steps between updates")
    batch_size: int = setting(8, "sequences per basis in each alignment")
    micro_batches: int = setting(1, "alignment batches per basis (and of the target) at each update")
    target_batch_size: int | None = setting(None, "sequences of the specialized set per micro-batch (None: batch_size)")

    needs: ClassVar[frozenset[str]] = frozenset({"model", "learning_rate"})

    def validate(self, section: str = "strategy") -> None:
        try:
            check_doge_params(self.mu, self.clip_min, self.clip_max, self.grad_clip, self.every)
        except ValueError as err:
            raise ValueError(f"{section}.{err}") from None
        for name in ("batch_size", "micro_batches"):
            require_positive_int(section, name, getattr(self, name))
        if self.target_batch_size is not None:
            require_positive_int(section, "target_batch_size", self.target_batch_size)

    def build(self, stream: MixtureStream, target: TargetSampler | None, attachment: Attachment) -> "DoGEStrategy":
        self.validate()
        return DoGEStrategy(stream, target=target, loss_fn=attachment.loss_fn, params=attachment.params,
                            lr_fn=attachment.lr_fn, mu=self.mu, clip_min=self.clip_min, clip_max=self.clip_max,
                            grad_clip=self.grad_clip, every=self.every, batch_size=self.batch_size,
                            micro_batches=self.micro_batches, target_batch_size=self.target_batch_size)


@dataclass
class DoGEStrategy(StrategyBase):
    """DoGE (Fan et al. 2024, "DoGE: Domain Reweighting with Generalization Estimation"), the baseline DGA is built
    on, in its out-of-domain form with the specialized set as the target domain. Every `every` steps, at the
    current parameters, on fresh alignment batches (the same draw as DGA's):

        s_j   = clip(lr_t * <g_j, g_spe> / (mean_i ||g_i|| + 1e-6), lr_t * clip_min, lr_t * clip_max)
        alpha = normalize(alpha * exp(s / mu))                                       no EMA

    with g_j and g_spe each first clipped to norm `grad_clip` (0: not clipped) and lr_t = `lr_fn()`, the current
    learning rate (e.g. `lambda: optimizer.param_groups[0]["lr"]`). `dgamix.mixer.doge` has the rule, its source
    and its defaults (mu = 0.05, clip_min = 0, clip_max = 5, grad_clip = 1.0: the paper's out-of-domain configs).
    `UpdateRecord.scores` are the s_j that moved the weights.

    Deviations from the reference implementation, each on purpose:
    - scores come from fresh batches of `batch_size` sequences per basis every `every` steps (DGA's draw, sharded
      across ranks), not from splitting each training batch by domain at every step;
    - the model trains on batches sampled from the mixture alpha, not on the alpha-weighted sum of the per-domain
      gradients of a batch (the same expected gradient);
    - the bases may be distributions over clusters (distribution reweighting), not only disjoint domains;
    - gradient clipping is applied through the norms (exactly the clipped dot products and norms), and only to
      the scoring gradients: the trainer's own gradients are not clipped here;
    - the reference's average of the weights over updates (what it hands to the final model) is kept as
      `average_weights`, but the stream samples with the current weights, as the reference's proxy run does;
    - non-finite scores skip the update (DGA's behaviour; the reference would write NaN weights);
    - only the out-of-domain rule: the universal setting (target = all domains, self-alignment removed) is not
      implemented.
    Only the exact estimator is supported: the normalization needs the gradient norms.
    """

    stream: MixtureStream
    _: KW_ONLY
    target: TargetSampler
    loss_fn: Callable[[torch.Tensor], torch.Tensor]
    params: list[torch.nn.Parameter]
    lr_fn: Callable[[], float]
    mu: float = DoGE.mu
    clip_min: float = DoGE.clip_min
    clip_max: float = DoGE.clip_max
    grad_clip: float = DoGE.grad_clip
    every: int = DoGE.every
    batch_size: int = DoGE.batch_size
    micro_batches: int = DoGE.micro_batches
    target_batch_size: int | None = DoGE.target_batch_size

    needs: ClassVar[frozenset[str]] = DoGE.needs
    # Saved and checked on load, as DGA's: each changes the weights a run reaches or the sequences it draws. The
    # learning rate is not among them: its schedule is the optimizer's (and scheduler's) state.
    SETTINGS: ClassVar[tuple[str, ...]] = ("mu", "clip_min", "clip_max", "grad_clip", "every", "batch_size",
                                           "micro_batches", "target_batch_size")

    def __post_init__(self) -> None:
        check_doge_params(self.mu, self.clip_min, self.clip_max, self.grad_clip, self.every)
        if not callable(self.lr_fn):
            raise ValueError("lr_fn: expected a callable returning the current learning rate, e.g. "
                             "lambda: optimizer.param_groups[0]['lr']")
        if self.target_batch_size is None:
            self.target_batch_size = self.batch_size
        self.draw = AlignmentDraw(self.stream, self.target, self.batch_size, self.micro_batches,
                                  self.target_batch_size)
        self.updates = 0
        self.skipped = 0
        self.weights_sum = np.zeros(self.stream.mixture.n_bases)  # over the updates: average_weights

    @property
    def average_weights(self) -> np.ndarray:
        """The mean of the weights after each update (the reference's output for the final run); the current
        weights before the first."""
        done = self.updates - self.skipped
        return self.weights_sum / done if done else self.weights.copy()

    def alignment(self) -> tuple[np.ndarray, np.ndarray, float]:
        """(a_j = <g_j, g_spe>, ||g_j||, ||g_spe||) at the current parameters, on fresh alignment batches."""
        bases, target, shares = self.draw.draw()
        return exact_alignment_with_norms(self.loss_fn, self.params, bases, target, **shares)

    def on_step(self, step: int) -> UpdateRecord | None:
        """Call after optimizer.step() of step `step` (0-based), before the learning-rate scheduler steps (lr_fn
        then reads the rate that step used, as the reference does); updates every `every` steps."""
        if (step + 1) % self.every:
            return None
        with own_rng(self.params):
            alignments, norms, target_norm = self.alignment()
        new, scores, skipped = doge_update(self.weights, alignments, norms, target_norm, float(self.lr_fn()),
                                           self.mu, self.clip_min, self.clip_max, self.grad_clip)
        self.updates += 1
        self.skipped += int(skipped)
        if not skipped:
            self.stream.set_weights(new)
            self.weights_sum += self.weights
        return UpdateRecord(step, self.weights.tolist(), scores.tolist(), skipped)

    def state_dict(self) -> dict[str, Any]:
        return plain({"updates": self.updates, "skipped": self.skipped, "weights_sum": self.weights_sum,
                      "target": self.target.state_dict(), **self.settings()})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters, average and target position (the stream restores the weights); refused under
        other settings."""
        check_settings(self, state, "DoGE")
        self.updates, self.skipped = int(state["updates"]), int(state["skipped"])
        self.weights_sum = array(state["weights_sum"], np.float64)
        self.target.load_state_dict(state["target"])
