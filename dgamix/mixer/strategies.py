"""Mixing strategies behind one interface: a plain loop calls `strategy.on_step(step)` after `optimizer.step()`.

- `StaticStrategy`: fixed weights over the bases: uniform, natural, or importance sampling (weight 1 on the
  importance basis);
- `DGAStrategy`: Dynamic Gradient Alignment every `every` (T_r) steps, domain or distribution reweighting
  depending on the stream's bases, with the EMA variant when beta < 1;
- `InBatchDGAStrategy`: DGA scored from the training step itself (every training sequence's alignment with the
  specialized gradient, `inbatch` + `alignment_stats`), no extra backward per basis, updating as often as every step;
- `DoGEStrategy`: the DoGE baseline (learning-rate-scaled alignment normalized by the mean gradient norm, clipped,
  no EMA) on DGA's alignment draw.
A strategy's `state_dict()` holds its weights, EMA state, counters and its target sampler's position; the stream's
own state (training and auxiliary sampler positions) goes beside it in the checkpoint. DGA's state also records the
settings that shape its updates, and loading it under other settings is refused (StateMismatchError), as the stream
refuses another store.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable

import numpy as np
import torch

from ..core.defaults import DEFAULTS
from .alignment_stats import SCALES, AlignmentStats, auto_decay, scale_scores
from .dga import ESTIMATORS, check_dga_params, dga_update, exact_alignment_with_norms
from .doge import check_doge_params, doge_update
from .distributed import rank_and_world_size, shard_bounds
from .mixture import check_weights
from .state import array, plain
from .stream import MixtureStream, StateMismatchError, TargetSampler

log = logging.getLogger(__name__)
_TRAIN = DEFAULTS["train"]  # the one place DGA's defaults are defined (params.yaml's train section)


@dataclass
class UpdateRecord:
    step: int
    weights: list[float]
    scores: list[float]
    skipped: bool


class StaticStrategy:
    def __init__(self, stream: MixtureStream, weights: np.ndarray | list[float] | None = None,
                 basis: str | None = None):
        names = stream.mixture.names
        if basis is not None:
            if basis not in names:
                raise ValueError(f"basis = '{basis}' is not among the stream's bases {names[:8]}...")
            weights = np.eye(len(names))[names.index(basis)]
        self.stream = stream
        self.weights = check_weights(np.full(len(names), 1 / len(names)) if weights is None else weights, len(names))
        stream.set_weights(self.weights)

    def on_step(self, step: int) -> None:  # nothing changes
        return None

    def state_dict(self) -> dict[str, Any]:
        return plain({"weights": self.weights})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights = check_weights(array(state["weights"], np.float64), len(self.weights))
        self.stream.set_weights(self.weights)


def own_rng(params: Iterable[torch.Tensor]) -> contextlib.AbstractContextManager:
    """Run alignment forwards (dropout in training mode) on a fork of the RNG: they leave the training's random
    stream where it was, so a trainer that restores its RNG state on resume (the Hugging Face Trainer, Lightning)
    resumes exactly, and training draws the same dropout masks with DGA on or off."""
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    return torch.random.fork_rng(devices=devices)


def draw_alignment_batches(stream: MixtureStream, target: TargetSampler, batch_size: int, target_batch_size: int,
                           micro_batches: int) -> tuple[list[list[torch.Tensor]], list[torch.Tensor], dict[str, float]]:
    """This rank's slices of one alignment draw: `micro_batches` target batches (drawn first), then as many batches
    of each basis, and {basis_share, target_share}, this rank's fraction of each batch's sequences (the
    estimators' share-weighting). The draw order is part of every recorded run: DGA and DoGE share it."""
    rank, world = rank_and_world_size()
    micro = lambda draw: [draw() for _ in range(micro_batches)]  # noqa: E731
    target_batches = micro(lambda: target.sample(target_batch_size, rank, world))
    bases = [micro(lambda j=j: stream.sample_basis(j, batch_size, rank, world)["tokens"])
             for j in range(stream.mixture.n_bases)]

    def share(size: int) -> float:  # this rank's fraction of a batch of `size` sequences
        start, stop = shard_bounds(size, rank, world)
        return (stop - start) / size

    return bases, target_batches, {"basis_share": share(batch_size), "target_share": share(target_batch_size)}


def _check_shardable(batch_size: int, target_batch_size: int, world_size: int) -> None:
    """Every rank needs at least one sequence of each batch: a rank with none would have no loss to differentiate,
    and under FSDP it would skip the collectives of the others' forwards and backwards."""
    if min(batch_size, target_batch_size) < world_size:
        raise ValueError(f"batch_size = {batch_size}, target_batch_size = {target_batch_size} with "
                         f"world size {world_size}: the alignment batches are split across ranks, so expected "
                         f"both >= the world size ({world_size}), e.g. a multiple of it")


@dataclass
class DGAStrategy:
    """DGA over the stream's bases. `loss_fn(tokens)` returns the model's mean LM loss on a (n, seq_len+1) batch.

    Estimators of the alignment scores: "exact" (one backward per basis), "finite_difference" (two no-grad
    forwards at theta +- eps g) and "forward" (forward-mode AD along g; needs `module`). Given
    `sequence_loss_fn(tokens) -> (n,) losses`, the two forward estimators batch all bases together.
    """

    stream: MixtureStream
    target: TargetSampler
    loss_fn: Callable[[torch.Tensor], torch.Tensor]
    params: list[torch.nn.Parameter]
    eta: float = _TRAIN["eta"]
    beta: float = _TRAIN["beta"]
    every: int = _TRAIN["every"]
    batch_size: int = _TRAIN["dga_batch_size"]  # sequences per basis in each alignment
    micro_batches: int = 1
    # sequences of the specialized set per micro-batch (None: batch_size)
    target_batch_size: int | None = _TRAIN["dga_target_batch_size"]
    estimator: str = _TRAIN["estimator"]
    module: torch.nn.Module | None = None  # the model the loss calls: needed by the "forward" estimator
    sequence_loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None

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
        if min(self.batch_size, self.micro_batches, self.target_batch_size) < 1:
            raise ValueError(f"batch_size = {self.batch_size}, micro_batches = {self.micro_batches}, "
                             f"target_batch_size = {self.target_batch_size}: expected >= 1")
        available = np.asarray(self.stream.mixture.bases.sum(axis=1)).ravel() > 0
        if not available.all():
            raise ValueError("a basis has no available tokens")
        self._check_shardable(rank_and_world_size()[1])  # early, where the process group already exists
        self.updates = 0
        self.skipped = 0

    @property
    def weights(self) -> np.ndarray:
        return self.stream.weights

    def alignment_scores(self) -> np.ndarray:
        """Scores at the current parameters, on fresh batches from each basis and the specialized set.

        Under torch.distributed the draw is sharded: every rank plans each whole batch (the auxiliary cursors and
        the target position advance identically everywhere, so the state stays rank-independent and exactly
        resumable) and computes only its contiguous share of the sequences (`shard_bounds`; when the batch size is
        not a multiple of the world size the shares differ by one and are weighted by their size). The estimator
        combines the ranks' partial results into the scores of one process over the whole batches."""
        self._check_shardable(rank_and_world_size()[1])
        bases, target, shares = draw_alignment_batches(self.stream, self.target, self.batch_size,
                                                       self.target_batch_size, self.micro_batches)
        return ESTIMATORS[self.estimator](self.loss_fn, self.params, bases, target, module=self.module,
                                          sequence_loss_fn=self.sequence_loss_fn, **shares)

    def _check_shardable(self, world_size: int) -> None:
        _check_shardable(self.batch_size, self.target_batch_size, world_size)

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
        return plain({"weights": self.weights, "updates": self.updates, "skipped": self.skipped,
                      "target": self.target.state_dict(), **{name: getattr(self, name) for name in self.SETTINGS}})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the weights, counters and target position; refused when the state was saved under other
        settings (a resumed run would not be the run that was saved)."""
        _check_settings(self, state, "DGA")
        self.stream.set_weights(array(state["weights"], np.float64))
        self.updates, self.skipped = int(state["updates"]), int(state["skipped"])
        self.target.load_state_dict(state["target"])


@dataclass
class DoGEStrategy:
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
    target: TargetSampler
    loss_fn: Callable[[torch.Tensor], torch.Tensor]
    params: list[torch.nn.Parameter]
    lr_fn: Callable[[], float]
    mu: float = _TRAIN["doge_mu"]
    clip_min: float = _TRAIN["doge_clip_min"]
    clip_max: float = _TRAIN["doge_clip_max"]
    grad_clip: float = _TRAIN["doge_grad_clip"]
    every: int = _TRAIN["every"]
    batch_size: int = _TRAIN["dga_batch_size"]
    micro_batches: int = 1
    target_batch_size: int | None = _TRAIN["dga_target_batch_size"]

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
        if min(self.batch_size, self.micro_batches, self.target_batch_size) < 1:
            raise ValueError(f"batch_size = {self.batch_size}, micro_batches = {self.micro_batches}, "
                             f"target_batch_size = {self.target_batch_size}: expected >= 1")
        if not (np.asarray(self.stream.mixture.bases.sum(axis=1)).ravel() > 0).all():
            raise ValueError("a basis has no available tokens")
        _check_shardable(self.batch_size, self.target_batch_size, rank_and_world_size()[1])
        self.updates = 0
        self.skipped = 0
        self.weights_sum = np.zeros(self.stream.mixture.n_bases)  # over the updates: average_weights

    @property
    def weights(self) -> np.ndarray:
        return self.stream.weights

    @property
    def average_weights(self) -> np.ndarray:
        """The mean of the weights after each update (the reference's output for the final run); the current
        weights before the first."""
        done = self.updates - self.skipped
        return self.weights_sum / done if done else self.weights.copy()

    def alignment(self) -> tuple[np.ndarray, np.ndarray, float]:
        """(a_j = <g_j, g_spe>, ||g_j||, ||g_spe||) at the current parameters, on fresh alignment batches."""
        _check_shardable(self.batch_size, self.target_batch_size, rank_and_world_size()[1])
        bases, target, shares = draw_alignment_batches(self.stream, self.target, self.batch_size,
                                                       self.target_batch_size, self.micro_batches)
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
        return plain({"weights": self.weights, "updates": self.updates, "skipped": self.skipped,
                      "weights_sum": self.weights_sum, "target": self.target.state_dict(),
                      **{name: getattr(self, name) for name in self.SETTINGS}})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the weights, counters, average and target position; refused under other settings."""
        _check_settings(self, state, "DoGE")
        self.stream.set_weights(array(state["weights"], np.float64))
        self.updates, self.skipped = int(state["updates"]), int(state["skipped"])
        self.weights_sum = array(state["weights_sum"], np.float64)
        self.target.load_state_dict(state["target"])


@dataclass
class InBatchDGAStrategy:
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

    Plain loop: `loss.backward(); strategy.observe(batch); optimizer.step(); strategy.on_step(step)`, with `batch`
    the stream's batch (its `cluster` and `prob`) and `loss` the mean over its sequences (else pass `loss_scale`).
    """

    stream: MixtureStream
    target: TargetSampler
    tracker: Any  # inbatch.InBatchAlignment on the model whose loss `loss_fn` computes
    loss_fn: Callable[[torch.Tensor], torch.Tensor]
    eta: float = _TRAIN["inbatch_eta"]
    beta: float = 1.0
    every: int = _TRAIN["inbatch_every"]
    score_every: int = _TRAIN["inbatch_score_every"]
    refresh: int = _TRAIN["inbatch_refresh"]
    target_batch_size: int = _TRAIN["dga_batch_size"]
    decay: float | None = _TRAIN["inbatch_decay"]  # None: alignment_stats.auto_decay for this many bases/clusters
    min_sequences: float = _TRAIN["inbatch_min_sequences"]
    scale: str = _TRAIN["inbatch_scale"]
    level: str = "bases"
    floor: float = _TRAIN["weight_floor"]

    SETTINGS: ClassVar[tuple[str, ...]] = ("eta", "beta", "every", "score_every", "refresh", "target_batch_size",
                                           "decay", "min_sequences", "scale", "level", "floor")

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
        k = self.stream.mixture.n_clusters
        if self.decay is None:
            self.decay = auto_decay(self._sequences_per_update(), self._n_scored(), self.min_sequences)
        self._warn_if_never_scored()
        self.stats = AlignmentStats(k, self.decay)
        self.window = AlignmentStats(k)  # sequences since the last update, merged across ranks at the update
        self.weights = self.stream.weights
        self.updates, self.skipped = 0, 0
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

    def refresh_target(self) -> None:
        """g_spe at the current parameters, from a fresh target batch (one backward; .grad untouched)."""
        with own_rng(p for _, p in self.tracker.params):
            self._target_gradient = self.tracker.refresh_target(self.loss_fn,
                                                                [self.target.sample(self.target_batch_size)])

    def scores_step(self, step: int) -> bool:
        """Whether step `step`'s sequences are scored: every `score_every`-th step (fewer scored steps cost less and
        keep the estimates unbiased, with fewer samples). Run the other steps' forward and backward inside
        `tracker.paused()`."""
        return step % self.score_every == 0

    def observe(self, batch: dict[str, Any], loss_scale: float | None = None) -> None:
        """The alignments of the batch just backpropagated (`loss_scale`: each sequence's weight in that loss;
        default 1 / its number of sequences, a mean)."""
        clusters = batch["cluster"].numpy()
        scale = 1.0 / len(clusters) if loss_scale is None else loss_scale
        scores = self.tracker.collect(loss_scale=scale, n_sequences=len(clusters)).cpu().numpy()
        self.tracker.take()  # the strategy keeps its own statistics; nothing accumulates in the tracker
        self.window.add(clusters, scores, batch["prob"].numpy())

    def scores(self) -> np.ndarray:
        """The scaled score of every basis, from the statistics so far."""
        bases = self.stream.mixture.bases
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
        if (step + 1) % self.every == 0:
            record = self._update(step)  # None when no sequence was scored since the last update
        if (step + 1) % self.refresh == 0:
            self.refresh_target()
        return record

    def _update(self, step: int) -> UpdateRecord | None:
        device = next(iter(p.device for _, p in self.tracker.params), "cpu")
        self.window.merge_across_ranks(device)  # every rank then holds the same statistics and scores
        if self.window.sequences == 0:  # no new evidence (score_every > every): the weights stay
            return None
        self._record(step)
        self.stats.absorb(self.window)
        self.window = AlignmentStats(self.stats.n_clusters)
        scores = self.scores()
        new, skipped = dga_update(self.weights, scores, self.eta, self.beta)
        if not skipped and self.floor > 0:  # mixed with uniform, as EXP3 explores: every weight >= floor / m
            new = (1.0 - self.floor) * new + self.floor / len(new)
        self.weights = new
        self.updates += 1
        self.skipped += int(skipped)
        if not skipped:
            self.stream.set_weights(new)
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
        return plain({"weights": self.weights, "updates": self.updates, "skipped": self.skipped,
                      "stats": self.stats.state_dict(), "window": self.window.state_dict(),
                      # g_spe as last refreshed: a run resumed between two refreshes scores with the same g.
                      "target_gradient": self._target_gradient.detach().cpu(),
                      "target": self.target.state_dict(), **{name: getattr(self, name) for name in self.SETTINGS}})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore weights, statistics, g_spe and the target's position: the resumed run continues exactly."""
        _check_settings(self, state, "in-batch DGA")
        self.weights = array(state["weights"], np.float64)
        self.stream.set_weights(self.weights)
        self.updates, self.skipped = int(state["updates"]), int(state["skipped"])
        self.stats.load_state_dict(state["stats"])
        self.window.load_state_dict(state["window"])
        self._target_gradient = torch.as_tensor(state["target_gradient"])
        self.tracker.set_target(self._target_gradient)
        self.target.load_state_dict(state["target"])


def _check_settings(strategy: Any, state: dict[str, Any], what: str) -> None:
    differing = []
    for name in strategy.SETTINGS:
        now = getattr(strategy, name)
        if name not in state:
            differing.append(f"{name}: not saved, now {now!r}")
        elif _plain(state[name]) != now:
            differing.append(f"{name}: saved {_plain(state[name])!r}, now {now!r}")
    if differing:
        raise StateMismatchError(f"the saved {what} state was made with other settings; refusing to resume under "
                                 "different ones: " + "; ".join(differing))


def _plain(value: Any) -> Any:
    """A saved setting as a Python scalar (a checkpoint may hold it as a 0-d tensor or numpy scalar)."""
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value


def exp3_probabilities(cumulative_rewards: np.ndarray, step: int) -> tuple[np.ndarray, float]:
    """EXP3 policy of Online Data Mixing (Albalak et al. 2023): pi = (1 - K eps) softmax(eps R) + eps, with the
    decaying exploration rate eps_t = min(1/K, sqrt(ln K / (K t)))."""
    k = len(cumulative_rewards)
    eps = min(1.0 / k, float(np.sqrt(np.log(k) / (k * max(step, 1)))))
    logits = eps * np.asarray(cumulative_rewards, dtype=np.float64)
    soft = np.exp(logits - logits.max())
    soft /= soft.sum()
    return (1 - k * eps) * soft + eps, eps


class ODMStrategy:
    """Online Data Mixing (EXP3 bandit), the online peer: each domain's reward is its training loss, importance
    weighted by the probability it was drawn with. The loop calls `observe(clusters, losses)` with the batch's
    per-sequence clusters and losses, then `on_step(step)`. Bases must be domains: each cluster belongs to one
    basis (identity or coarse bases)."""

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

    def observe(self, clusters: np.ndarray | torch.Tensor, losses: np.ndarray | torch.Tensor) -> None:
        clusters = np.asarray(clusters)
        losses = np.asarray(losses, dtype=np.float64)
        domains = self.owner[clusters]
        policy = self.stream.weights
        for domain in np.unique(domains):
            if domain >= 0:
                self.rewards[domain] += losses[domains == domain].mean() / policy[domain]

    def on_step(self, step: int) -> None:
        self.steps = step + 1
        self.stream.set_weights(exp3_probabilities(self.rewards, self.steps + 1)[0])

    def state_dict(self) -> dict[str, Any]:
        return plain({"rewards": self.rewards, "steps": self.steps})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rewards = array(state["rewards"], np.float64)
        self.steps = int(state["steps"])
