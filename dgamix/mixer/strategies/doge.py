"""The DoGE baseline (Fan et al. 2024): learning-rate-scaled alignment normalized by the mean gradient norm,
clipped, no EMA, updated at every optimizer step on DGA's alignment draw."""
from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from ..doge import check_doge_params, doge_update
from ..dga import exact_alignment_with_norms
from ..distributed import rank_and_world_size
from ..state import array, plain
from ...core.config import setting
from ..stream import MixtureStream, TargetSampler
from .base import (AlignmentDraw, Attachment, StrategyBase, UpdateRecord, check_settings, own_rng, require_positive_int,
                   trainable_parameters)


@dataclass(frozen=True)
class DoGE:
    """DoGE's out-of-domain settings (the paper's configs), its cadence (every optimizer step, as the reference) and
    DGA's alignment draw, sized by default as the reference's per-domain share of one training batch."""

    mu: float = setting(0.05, "Bregman coefficient: alpha <- normalize(alpha * exp(s / mu))")
    clip_min: float = setting(0.0, "scores are clipped to [lr * clip_min, lr * clip_max]")
    clip_max: float = setting(5.0, "upper clip of the scores, in units of the learning rate")
    grad_clip: float = setting(1.0, "each scoring gradient clipped to this norm first (0: not clipped)")
    every: int = setting(1, "optimizer steps between updates (1: every step, as the reference)")
    batch_size: int | None = setting(None, "sequences per basis in each alignment (None: the reference's per-domain "
                                           "share of a training batch, max(world, global batch // (m + 1)))")
    micro_batches: int = setting(1, "alignment batches per basis (and of the target) at each update")
    target_batch_size: int | None = setting(None, "sequences of the specialized set per micro-batch (None: batch_size)")

    needs: ClassVar[frozenset[str]] = frozenset({"model", "learning_rate"})

    def validate(self, section: str = "strategy") -> None:
        try:
            check_doge_params(self.mu, self.clip_min, self.clip_max, self.grad_clip, self.every)
        except ValueError as err:
            raise ValueError(f"{section}.{err}") from None
        require_positive_int(section, "micro_batches", self.micro_batches)
        for name in ("batch_size", "target_batch_size"):
            if getattr(self, name) is not None:
                require_positive_int(section, name, getattr(self, name))

    def build(self, stream: MixtureStream, target: TargetSampler | None, attachment: Attachment) -> "DoGEStrategy":
        self.validate()
        return DoGEStrategy(stream, target=target, loss_fn=attachment.loss_fn, params=attachment.params,
                            lr_fn=attachment.lr_fn, mu=self.mu, clip_min=self.clip_min, clip_max=self.clip_max,
                            grad_clip=self.grad_clip, every=self.every, batch_size=self.batch_size,
                            micro_batches=self.micro_batches, target_batch_size=self.target_batch_size)


def reference_share(stream: MixtureStream) -> int:
    """Sequences per basis of the reference's scoring sample: one global training batch split evenly over the m
    bases and the target (m + 1 domains), at least one sequence per rank (the draw is split across ranks)."""
    return max(rank_and_world_size()[1], stream.batch_size * stream.world_size // (stream.mixture.n_bases + 1))


@dataclass
class DoGEStrategy(StrategyBase):
    """DoGE (Fan et al. 2024, "DoGE: Domain Reweighting with Generalization Estimation"), the baseline DGA is built
    on, in its out-of-domain form with the specialized set as the target domain. Every `every` optimizer steps (by
    default every step, the reference's cadence), at the current parameters, on fresh alignment batches (the same
    draw as DGA's):

        s_j   = clip(lr_t * <g_j, g_spe> / (mean_i ||g_i|| + 1e-6), lr_t * clip_min, lr_t * clip_max)
        alpha = normalize(alpha * exp(s / mu))                                       no EMA

    with g_j and g_spe each first clipped to norm `grad_clip` (0: not clipped) and lr_t = `lr_fn()`, the current
    learning rate (e.g. `lambda: optimizer.param_groups[0]["lr"]`). `dgamix.mixer.doge` has the rule, its source
    and its defaults (mu = 0.05, clip_min = 0, clip_max = 5, grad_clip = 1.0: the paper's out-of-domain configs).
    `UpdateRecord.scores` are the s_j that moved the weights.

    How the reference samples and steps, and what this strategy does instead. The reference draws each training
    batch from a fixed uniform mixture over all its domains (the training domains and the target), splits it by
    domain, and takes one gradient per domain, clipped to norm G (its max_grad_norm), at the current parameters; it
    scores the training domains against the target's gradient of that same batch, updates alpha, and steps the
    model on sum_j alpha_j clip(g_j) (the target's gradient only scores). Here the trainer samples its batch from
    the mixture alpha and steps on its own gradient of the mean loss (not clipped by this strategy); the scores
    come from separate fresh batches of `batch_size` sequences per basis and `target_batch_size` of the target,
    drawn after the optimizer step. The scoring sample is uniform over the bases and independent of alpha, as the
    reference's is; a training batch drawn from alpha would give a basis of small weight few sequences or none,
    and with bases that overlap (distributions over clusters) a sequence need not belong to one basis, so the
    training batch is not split. In expectation both train on sum_j alpha_j E[g_j], up to the reference's
    per-domain clipping (nonlinear, so not exactly). Timing matches: the update after step t's optimizer step reads
    the parameters theta_{t+1} and sets the mixture of step t + 1's batch; the reference, at step t + 1, scores at
    theta_{t+1} and weights step t + 1's gradients.

    Default size of the draw (`batch_size=None`): the reference's per-domain share of one training batch,
    max(world size, global batch // (m + 1)) sequences per basis and as many of the target (`target_batch_size=
    None`), so each update scores about one training batch of sequences, as the reference's does. Cost per update:
    m + 1 forward and backward passes over those sequences (under DDP, also one gradient-sized all-reduce per basis
    for its norm), about one training step of FLOPs when m + 1 <= the global batch, plus the fixed cost of m + 1
    small passes instead of one; at every step that roughly doubles a training step or more (BENCHMARKS.md, "DoGE
    at the reference cadence"). The reference pays about one step, since its per-domain passes are its training.
    `every` > 1 divides the cost and departs from the reference's cadence.

    Other deviations from the reference implementation, each on purpose:
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
    batch_size: int | None = DoGE.batch_size
    micro_batches: int = DoGE.micro_batches
    target_batch_size: int | None = DoGE.target_batch_size

    needs: ClassVar[frozenset[str]] = DoGE.needs
    # Saved and checked on load, as DGA's: each changes the weights a run reaches or the sequences it draws. The
    # learning rate is not among them: its schedule is the optimizer's (and scheduler's) state.
    SETTINGS: ClassVar[tuple[str, ...]] = ("mu", "clip_min", "clip_max", "grad_clip", "every", "batch_size",
                                           "micro_batches", "target_batch_size")

    def __post_init__(self) -> None:
        self.params = trainable_parameters(self.params, "DoGEStrategy")
        check_doge_params(self.mu, self.clip_min, self.clip_max, self.grad_clip, self.every)
        if not callable(self.lr_fn):
            raise ValueError("lr_fn: expected a callable returning the current learning rate, e.g. "
                             "lambda: optimizer.param_groups[0]['lr']")
        # Resolved here, so the saved settings are the sizes drawn (a resume rebuilds the same ones from the same
        # stream, whose batch size and world size its own state checks).
        if self.batch_size is None:
            self.batch_size = reference_share(self.stream)
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
        then reads the rate that step used, as the reference does); updates every `every` steps (every step by
        default)."""
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
