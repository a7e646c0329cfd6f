"""In-batch DGA: DGA scored from the sequences the training step already backpropagates (every training sequence's
alignment with the specialized gradient, `inbatch` + `alignment_stats`): no extra backward per basis, updating as
often as every step."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import KW_ONLY, dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from ..alignment_stats import SCALES, AlignmentStats, auto_decay, scale_scores
from ..dga import anchored_weights, average_scores, check_dga_params, dga_update, relative_gains
from ..distributed import rank_and_world_size, shard_bounds
from ..inbatch import InBatchAlignment, target_gradient
from ..state import array, plain
from ...core.config import setting
from ..stream import MixtureStream, TargetSampler
from .base import (Attachment, Evidence, StrategyBase, UpdateRecord, as_numpy, check_rule_settings, check_settings,
                   own_rng, require_positive_int, setting_error)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InBatchDGA:
    """In-batch DGA's settings (README, "In-batch DGA")."""

    rule: str = setting("anchored", "anchored (softmax(log alpha_0 + eta * relative gains)) | paper (compounding)")
    eta: float = setting(2.0, "anchored: log-odds per unit of relative gain; paper: step size on the scaled scores")
    beta: float = setting(1.0, "weight of the new scores in their average (anchored) or of the new alpha (paper)")
    every: int = setting(1, "optimizer steps between weight updates")
    score_every: int = setting(1, "score every k-th step's sequences (k > 1: cheaper, fewer samples)")
    refresh: int = setting(20, "T_r: steps between refreshes of the specialized gradient (one target backward)")
    target_batch_size: int = setting(8, "sequences of the specialized set per refresh")
    decay: float | None = setting(None, "weight older sequences keep at each update (None: from min_sequences and "
                                        "the number of bases or clusters, alignment_stats.auto_decay)")
    min_sequences: float = setting(8, "a basis or cluster with fewer recent sequences does not move")
    scale: str = setting("snr", "snr | standardized | raw (the paper's unscaled scores)")
    level: str = setting("bases", "bases (distribution reweighting) | clusters (each cluster's own mean alignment)")
    floor: float = setting(0.001, "every weight stays >= floor / m (never stuck at 0)")
    rank: int | None = setting(None, "None: exact target gradient; an int: low-rank per large layer (faster)")
    tau: float = setting(0.25, "anchored: prior scale of a relative gain; noisier estimates shrink toward 0")
    kl_cap: float | None = setting(None, "anchored: at most this KL(alpha || alpha_0) in nats (None: no cap)")
    target_noise: bool = setting(True, "anchored: standard errors count the noise of g_spe (a second dot product "
                                       "per sequence, along the split-half difference)")

    needs: ClassVar[frozenset[str]] = frozenset({"model", "backward_hooks"})

    def validate(self, section: str = "strategy") -> None:
        try:
            check_dga_params(self.eta, self.beta, self.every)
        except ValueError as err:
            raise ValueError(f"{section}.{err}") from None
        for name in ("score_every", "refresh", "target_batch_size"):
            require_positive_int(section, name, getattr(self, name))
        if self.rank is not None:
            require_positive_int(section, "rank", self.rank)
        if self.decay is not None and not 0 < self.decay <= 1:
            raise setting_error(section, "decay", self.decay, "None or 0 < decay <= 1")
        if self.scale not in SCALES:
            raise setting_error(section, "scale", self.scale, f"one of {', '.join(SCALES)}")
        if self.level not in ("bases", "clusters"):
            raise setting_error(section, "level", self.level, "'bases' (distribution reweighting) or 'clusters'")
        check_rule_settings(section, self.rule, self.kl_cap, self.tau)
        if not 0.0 <= self.floor < 1.0:
            raise setting_error(section, "floor", self.floor, "0 <= floor < 1 (share of a uniform weight kept)")

    def build(self, stream: MixtureStream, target: TargetSampler | None,
              attachment: Attachment) -> "InBatchDGAStrategy":
        self.validate()
        return InBatchDGAStrategy(stream, target=target, tracker=InBatchAlignment(attachment.model, rank=self.rank),
                                  loss_fn=attachment.loss_fn, eta=self.eta, beta=self.beta, every=self.every,
                                  score_every=self.score_every, refresh=self.refresh,
                                  target_batch_size=self.target_batch_size, decay=self.decay,
                                  min_sequences=self.min_sequences, scale=self.scale, level=self.level,
                                  floor=self.floor, rule=self.rule, tau=self.tau, kl_cap=self.kl_cap,
                                  target_noise=self.target_noise)


@dataclass
class InBatchDGAStrategy(StrategyBase):
    """DGA from the sequences the training step already backpropagates.

    After each training backward, `observe(batch)` takes every sequence's d_x = <grad l(theta; x), g_spe> from
    `tracker` (an `inbatch.InBatchAlignment` on the model) into per-cluster statistics. Every `every` steps the
    weights move: alpha <- normalize(alpha * exp(eta * s)), then the EMA with `beta`, then a mix with the uniform
    weights, (1 - floor) alpha + floor / m, so that no weight ever sticks at 0. The scores s:
    - `level="bases"` (distribution reweighting): the importance-weighted estimate of
      a_j = E_{c~P_j}[abar_c] from every sequence drawn (see `alignment_stats`);
    - `level="clusters"`: each cluster's decayed mean alignment, then s_j = sum_c P_j(c) s_c: with
      `Mixture.identity` bases, domain reweighting over every fine cluster.
    Scores are scaled by `scale` (`snr`: in units of their standard error, the default; `standardized`; `raw`: the
    paper's) and are 0 for whatever has fewer than `min_sequences` recent sequences. The specialized gradient g_spe
    is refreshed every `refresh` steps (T_r) on `target_batch_size` sequences of the target: the only extra backward.
    Under torch.distributed that target batch is split across the ranks, each differentiating its own share
    (`refresh_target`); `loss_fn` then calls the bare module, not its DistributedDataParallel wrapper.

    Plain loop: `with strategy.training_step(step): loss.backward()`, then `strategy.observe(Evidence(batch))`,
    `optimizer.step()`, `strategy.on_step(step)`, with `batch` the stream's batch (its `cluster` and `prob`) and
    `loss` the mean over its sequences (else give the Evidence its `loss_scale`).
    """

    stream: MixtureStream
    _: KW_ONLY
    target: TargetSampler
    tracker: InBatchAlignment  # on the model whose loss `loss_fn` computes
    loss_fn: Callable[[torch.Tensor], torch.Tensor]
    eta: float = InBatchDGA.eta
    beta: float = InBatchDGA.beta
    every: int = InBatchDGA.every
    score_every: int = InBatchDGA.score_every
    refresh: int = InBatchDGA.refresh
    target_batch_size: int = InBatchDGA.target_batch_size
    decay: float | None = InBatchDGA.decay  # None: alignment_stats.auto_decay for this many bases/clusters
    min_sequences: float = InBatchDGA.min_sequences
    scale: str = InBatchDGA.scale
    level: str = InBatchDGA.level
    floor: float = InBatchDGA.floor
    rule: str = InBatchDGA.rule
    tau: float = InBatchDGA.tau
    kl_cap: float | None = InBatchDGA.kl_cap
    target_noise: bool = InBatchDGA.target_noise

    needs: ClassVar[frozenset[str]] = InBatchDGA.needs

    SETTINGS: ClassVar[tuple[str, ...]] = ("eta", "beta", "every", "score_every", "refresh", "target_batch_size",
                                           "decay", "min_sequences", "scale", "level", "floor", "rule", "tau",
                                           "kl_cap", "target_noise")

    def __post_init__(self) -> None:
        check_dga_params(self.eta, self.beta, self.every)
        for name in ("refresh", "target_batch_size", "score_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} = {value!r}: expected a positive integer")
        if self.scale not in SCALES:
            raise ValueError(f"scale = {self.scale!r}: expected one of {', '.join(SCALES)}")
        if self.level not in ("bases", "clusters"):
            raise ValueError(f"level = {self.level!r}: expected 'bases' (distribution reweighting) or 'clusters'")
        if not 0.0 <= self.floor < 1.0:
            raise ValueError(f"floor = {self.floor!r}: expected 0 <= floor < 1 (share of a uniform weight kept)")
        check_rule_settings("strategy", self.rule, self.kl_cap, self.tau)
        self.check_shardable()  # early, where the process group already exists and before the first draw
        # The anchored rule's anchor (the weights when the strategy starts), the average of the scores, and the
        # split-half estimate of ||g_spe||^2 at the last refresh.
        self.prior = self.stream.weights
        self.score_average: np.ndarray | None = None
        self.gain = float("nan")
        k = self.stream.mixture.n_clusters
        if self.decay is None:
            self.decay = auto_decay(self._sequences_per_update(), self._n_scored(), self.min_sequences)
        self._warn_if_never_scored()
        self.stats = AlignmentStats(k, self.decay)
        self.window = AlignmentStats(k)  # sequences since the last update, merged across ranks at the update
        self.updates, self.skipped = 0, 0
        self.overflowed = 0  # micro-batches whose backward overflowed (fp16): not scored
        self._scoring = True  # whether the current training step's backward is scored (training_step)
        self.records: list[dict[str, Any]] = []  # per-cluster alignment of each update window (drain_records)
        self.refresh_target()

    def _warn_if_never_scored(self) -> None:
        """Under a uniform mixture, a basis (or cluster) sees about sequences_per_update / m new sequences per update
        and keeps 1 / (1 - decay) updates' worth: if that stays below min_sequences, nothing ever moves (e.g. 256
        clusters, batch 16, decay 0.95: 1.25 sequences)."""
        if self.decay >= 1.0:
            return
        steady = self._sequences_per_update() / self._n_scored() / (1.0 - self.decay)
        if steady < self.min_sequences:
            log.warning("in-batch DGA: a %s sees about %.2f recent sequences under uniform weights, below "
                        "min_sequences = %s, so most will never move; raise decay (memory 1 / (1 - decay) updates) "
                        "or lower min_sequences", "cluster" if self.level == "clusters" else "basis", steady,
                        self.min_sequences)

    def _sequences_per_update(self) -> int:
        return self.stream.batch_size * self.stream.world_size * max(1, self.every // self.score_every)

    def _n_scored(self) -> int:
        """What min_sequences gates: the bases, or (level clusters) the clusters some basis covers."""
        if self.level == "bases":
            return self.stream.mixture.n_bases
        return int(np.count_nonzero(np.asarray(self.stream.mixture.bases.sum(axis=0)).ravel()))

    def check_shardable(self) -> None:
        """Under torch.distributed every rank differentiates its contiguous share of the target batch (under the
        anchored rule, of each of its two halves): a rank with no sequence would have no loss to differentiate."""
        world = rank_and_world_size()[1]
        if self.rule == "anchored":
            needed = 2 * world
            why = ("the anchored rule splits the target batch in two halves to measure ||g_spe||^2, and each half "
                   "is split across the ranks")
            expected = f"expected >= 2 x the world size ({needed})"
        else:
            needed = world
            why = "the target batch is split across the ranks"
            expected = f"expected >= the world size ({needed})"
        if self.target_batch_size < needed:
            raise ValueError(f"target_batch_size = {self.target_batch_size} with world size {world}: {why}, so "
                             f"{expected}; raise target_batch_size, e.g. to a multiple of {needed}")

    def refresh_target(self) -> None:
        """g_spe at the current parameters, from a fresh target batch (.grad untouched). The anchored rule takes it
        as two halves (two half-size backwards, the cost of one): g_spe is their mean, and the dot product of the
        halves' gradients is an unbiased estimate of ||g_spe||^2, the unit of its scores.

        Under torch.distributed every rank plans the whole batch (the target's position advances identically, so
        its state stays rank-independent and exactly resumable) and differentiates only its contiguous share of it
        (of each half, under the anchored rule); each gradient is the share-weighted sum of the ranks' (one
        reduction per gradient), so every rank holds g_spe and G of one process over the whole batch, up to float
        rounding."""
        self.check_shardable()
        rank, world = rank_and_world_size()
        n = self.target_batch_size

        def share(size: int) -> float:  # this rank's fraction of a batch of `size` sequences
            start, stop = shard_bounds(size, rank, world)
            return (stop - start) / size

        with own_rng(p for _, p in self.tracker.params):
            if self.rule == "paper":
                self._noise_direction = None
                batch = self.target.sample(n, rank, world)
                self._target_gradient = self.tracker.refresh_target(self.loss_fn, [batch], share(n))
                return
            # The two halves are drawn one after the other, which reads the sequences (and advances the position)
            # exactly as one draw of n would, so that each rank can take its share of each half.
            half = n // 2
            first_batch = self.target.sample(half, rank, world)
            second_batch = self.target.sample(n - half, rank, world)
            params = [p for _, p in self.tracker.params]
            with self.tracker.paused():
                first = target_gradient(self.loss_fn, params, [first_batch], share(half))
                second = target_gradient(self.loss_fn, params, [second_batch], share(n - half))
            self.gain = float(torch.dot(first.double(), second.double()))
            self._target_gradient = (first * half + second * (n - half)) / n
            # h: the halves' difference scaled to the covariance of g's own noise, (g1 - g2) / 2 for equal halves
            # (alignment_stats: the noise of g_spe)
            self._noise_direction = ((first - second).mul_((half * (n - half)) ** 0.5 / n) if self.target_noise
                                     else None)
            self.tracker.set_target(self._target_gradient, self._noise_direction)

    def scores_step(self, step: int) -> bool:
        """Whether step `step`'s sequences are scored: every `score_every`-th step (fewer scored steps cost less and
        keep the estimates unbiased, with fewer samples). Run the other steps' forward and backward inside
        `tracker.paused()`."""
        return step % self.score_every == 0

    def training_step(self, step: int) -> contextlib.AbstractContextManager:
        """The training forward and backward of `step`: scored (hooks on) every `score_every`-th step, else inside
        `tracker.paused()`; `observe` then ignores the unscored steps."""
        self._scoring = self.scores_step(step)
        return contextlib.nullcontext() if self._scoring else self.tracker.paused()

    def observe(self, evidence: Evidence) -> None:
        """The alignments of the batch just backpropagated (`evidence.loss_scale`: each sequence's weight in that
        loss; default 1 / its number of sequences, a mean)."""
        if not self._scoring:
            return
        batch = evidence.batch
        clusters = as_numpy(batch["cluster"])
        scale = 1.0 / len(clusters) if evidence.loss_scale is None else evidence.loss_scale
        scores = self.tracker.collect(loss_scale=scale, grad_scaler=evidence.grad_scaler,
                                      n_sequences=len(clusters)).cpu().numpy()
        noise = self.tracker.last_noise_scores
        noise = None if noise is None else noise.cpu().numpy()
        self.tracker.take()  # the strategy keeps its own statistics; nothing accumulates in the tracker
        if not np.isfinite(scores).all() or (noise is not None and not np.isfinite(noise).all()):
            self.overflowed += 1  # an overflowed fp16 backward: the GradScaler skips the step; so do we
            return
        self.window.add(clusters, scores, as_numpy(batch["prob"]), noise)

    def scores(self) -> np.ndarray:
        """The score of every basis, from the statistics so far: relative gains (anchored rule), or the scaled
        alignments (paper rule)."""
        bases = self.stream.mixture.bases
        if self.rule == "anchored":
            # The mixture's own alignment: the plain mean of every recent sequence's (drawn from the mixture).
            center = self.stats.total.sum() / self.stats.count.sum() if self.stats.count.sum() > 0 else 0.0
            if self.level == "bases":  # post-stratified: the luck of each cluster's draw count drops out
                a, se, seen = self.stats.stratified_estimates(bases)
                scored = seen >= self.min_sequences
                se = np.sqrt(se ** 2 + self.stats.shared_noise_variance(bases, scored))
                return relative_gains(a, self.weights, self.gain, se, self.tau, scored, center)
            means, se, seen = self.stats.cluster_means()
            scored = seen >= self.min_sequences
            se = np.sqrt(se ** 2 + self.stats.shared_noise_variance(None, scored))
            probs = self.stream.mixture.cluster_probs(self.weights)
            per_cluster = relative_gains(means, probs, self.gain, se, self.tau, scored, center)
            return np.asarray(bases @ per_cluster).ravel()
        if self.level == "bases":
            a, se, seen = self.stats.basis_estimates(bases)
            return scale_scores(a, se, seen, self.scale, self.min_sequences)
        means, se, seen = self.stats.cluster_means()
        per_cluster = scale_scores(means, se, seen, self.scale, self.min_sequences)
        return np.asarray(bases @ per_cluster).ravel()

    def on_step(self, step: int) -> UpdateRecord | None:
        """Call after optimizer.step() of step `step` (0-based): every `every` steps the weights move; every
        `refresh` steps g_spe is recomputed at the new parameters."""
        record = None
        # At a refresh the ending window's g_spe noise joins the past windows' (alignment_stats), before the
        # statistics age, so that it pools over the items the update just scored.
        fold = (step + 1) % self.refresh == 0 and self.rule == "anchored"
        if (step + 1) % self.every == 0:
            record = self._update(step, fold)  # None when no sequence was scored since the last update
        elif fold:
            self._fold_noise()
        if (step + 1) % self.refresh == 0:
            self.refresh_target()
        return record

    def _fold_noise(self) -> None:
        """Sequences scored since the last update (`every` not dividing `refresh`) are not in `stats` yet: their
        u_x, taken along the ending window's h, join the next window's sum (a small mix of two windows). Pooled over
        the scored items, or over those seen at all before any is scored."""
        bases = self.stream.mixture.bases if self.level == "bases" else None
        seen = self.stats.stratified_estimates(bases)[2] if bases is not None else self.stats.count
        scored = seen >= self.min_sequences
        self.stats.fold_noise(bases, scored if scored.any() else seen > 0)

    def _update(self, step: int, fold: bool = False) -> UpdateRecord | None:
        device = next(iter(p.device for _, p in self.tracker.params), "cpu")
        self.window.merge_across_ranks(device)  # every rank then holds the same statistics and scores
        if self.window.sequences == 0:  # no new evidence (score_every > every): the weights stay
            if fold:
                self._fold_noise()
            return None
        self._record(step)
        self.stats.absorb(self.window)
        self.window = AlignmentStats(self.stats.n_clusters)
        scores = self.scores()
        if self.rule == "anchored":
            skipped = not np.isfinite(scores).all()
            if not skipped:
                self.score_average = average_scores(self.score_average, scores, self.beta)
                new = anchored_weights(self.prior, self.score_average, self.eta, self.kl_cap)
        else:
            new, skipped = dga_update(self.weights, scores, self.eta, self.beta)
            if not skipped and self.floor > 0:  # mixed with uniform, as EXP3 explores: every weight >= floor / m
                new = (1.0 - self.floor) * new + self.floor / len(new)
        self.updates += 1
        self.skipped += int(skipped)
        if not skipped:
            self.stream.set_weights(new)
        if fold:
            self._fold_noise()
        self.stats.age()
        return UpdateRecord(step, self.weights.tolist(), scores.tolist(), skipped)

    def _record(self, step: int) -> None:
        seen = np.flatnonzero(self.window.count > 0)
        for c in seen.tolist():
            self.records.append({"step": step, "cluster": c, "sequences": int(self.window.count[c]),
                                 "mean_alignment": float(self.window.total[c] / self.window.count[c])})

    def drain_records(self) -> list[dict[str, Any]]:
        """The per-cluster records since the last drain (step, cluster, sequences, mean_alignment); cleared."""
        records, self.records = self.records, []
        return records

    def state_dict(self) -> dict[str, Any]:
        return plain({"updates": self.updates, "skipped": self.skipped,
                      "stats": self.stats.state_dict(), "window": self.window.state_dict(),
                      # g_spe as last refreshed: a run resumed between two refreshes scores with the same g.
                      "target_gradient": self._target_gradient.detach().cpu(), "gain": self.gain,
                      "noise_direction": (None if self._noise_direction is None
                                          else self._noise_direction.detach().cpu()),
                      "prior": self.prior, "score_average": self.score_average,
                      "target": self.target.state_dict(), **self.settings()})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore statistics, g_spe and the target's position (the stream restores the weights): the resumed run
        continues exactly."""
        check_settings(self, state, "in-batch DGA")
        self.updates, self.skipped = int(state["updates"]), int(state["skipped"])
        self.stats.load_state_dict(state["stats"])
        self.window.load_state_dict(state["window"])
        self._target_gradient = torch.as_tensor(state["target_gradient"])
        noise = state.get("noise_direction")
        self._noise_direction = None if noise is None else torch.as_tensor(noise)
        self.tracker.set_target(self._target_gradient, self._noise_direction)
        self.gain = float(state["gain"])
        self.prior = array(state["prior"], np.float64)
        average = state["score_average"]
        self.score_average = None if average is None else array(average, np.float64)
        self.target.load_state_dict(state["target"])
