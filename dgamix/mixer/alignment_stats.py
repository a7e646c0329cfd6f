"""Alignment scores for every cluster and every basis, from the sequences the training stream actually drew.

Each training sequence x, drawn from cluster c_x with probability p_t(c_x) under the mixture in force at its step t,
carries d_x = <grad l(theta; x), g_spe> (computed from the training backward, see `inbatch`). From them:

Per cluster c (domain reweighting over fine clusters), a decayed running mean
    abar_c = S_c / N_c,   S_c = sum_x lambda^(age_x) d_x [c_x = c],   N_c = sum_x lambda^(age_x) [c_x = c],
where age_x counts the updates since x was seen and lambda = `decay` (1: plain running mean). N_c is the cluster's
number of recent sequences (what `min_sequences` gates). A weighted mean's variance is Var(d) sum w^2 / (sum w)^2:
its effective sample size is N_c^2 / N2_c with N2_c = sum_x lambda^(2 age_x) [c_x = c], which exceeds N_c under
decay (in steady state (1 + lambda) times it: old sequences count a little, but they do count), so the standard
errors divide by that, not by N_c.

Per basis j (distribution reweighting), the importance-weighted estimate of a_j = E_{c~P_j}[abar_c]:
    ahat_j = (1/n) sum_x z_jx,   z_jx = P_j(c_x) d_x / p_t(c_x),   n = sum_x lambda^(age_x) (decayed as above),
unbiased for a_j while p_t > 0 wherever P_j > 0 (a mixture always covers its bases' supports: p = alpha^T P with
alpha > 0). Its variance is Var(z_j) n2 / n^2 (n2 = sum_x lambda^(2 age_x), as for the clusters), estimated by
    se_j^2 = ( (1/n) sum_x z_jx^2 - ahat_j^2 ) n2 / n^2,
    sum_x z_jx^2 = sum_c P_j(c)^2 Q_c,   Q_c = sum_x d_x^2 / p_t(c_x)^2,
so only three k-vectors are kept (S/p, Q and the counts): memory does not grow with the number of bases, and
every basis is scored from every sequence that falls in its support. The variance grows as P_j departs from p
(the weights P_j/p are large where p is small): a basis the mixture rarely visits is scored with a large se.
Post-stratified (`stratified_estimates`, what the anchored rule uses): ahat_j = sum_c P_j(c) abar_c (unseen
clusters at the mean of all recent sequences) removes the variance of how many sequences each cluster happened to
draw, times the clusters' mean alignments. `bench/stratified_estimates.py` measures both on the same sequences:
at the magnitudes recorded on the development corpus (per-sequence spread far above the clusters' means) the mean
squared error falls by 7%; with a large common part or large cluster offsets by 4.9x or 1.8x; it was never worse.

The noise of g_spe. Every sequence of one refresh window is scored along the same estimate g = g_spe + e, so the
per-sequence spread above misses a part of the error that more training sequences never average away:
<grad l(x), e> is shared by the whole window (and its common part, shared by every cluster, cancels in the
centered scores; the rest does not). It is measured with the split halves of the target batch, as exact DGA does:
with h = sqrt(n1 n2) / n (g1 - g2) (equal halves: (g1 - g2) / 2), an independent vector with the covariance of e,
each sequence also carries u_x = <grad l(x), h> (`add(..., noise=u)`). Within a window the decayed per-cluster sums
U_c = sum_x lambda^(age_x) u_x [c_x = c] give one draw of each centered estimate's g-noise,
    v_j = sum_c b_jc U_c,  b_jc = P_j(c) / N_c - (1 - m_j) / N   (clusters: v_c = U_c / N_c - U / N),
m_j being P_j's mass on unseen clusters (counted at the mean U / N, as the estimates count them). v_j^2 also holds
each sequence's own <grad l(x) - mean, e>, which the per-sequence spread already counts; the products of distinct
sequences hold only the shared part, so the window's share of the variance is estimated without bias by
    v_j^2 - sum_c b_jc^2 Q_c,   Q_c = sum_x lambda^(2 age_x) u_x^2 [c_x = c]
(a U-statistic: may be negative in one window, the total is floored at 0). At each refresh the window is folded
(`fold_noise`: the mean over the scored items, pooled as exact DGA pools) into a decayed sum, and U, Q restart;
`shared_noise_variance` adds the current window. A folded window's share goes as 1 / N^2 at the time it is read
(its U / N_c terms shrink as later sequences join N), so it is kept times N^2 at the fold, which ages by lambda^2 as
N^2 does, and divided by the current N^2 when read: exact while the clusters' shares of N stay put, and no window
folded early, while N was small, keeps its then-large share for the whole memory.

A cluster or basis with fewer than `min_sequences` (effective) recent sequences in its support gets score 0: it does
not move on one noisy sample. Under a uniform mixture of m bases (or clusters) and B sequences per update, each holds
about B / m / (1 - lambda) recent sequences in steady state; `auto_decay` picks lambda so that this is twice
`min_sequences` (memory 2 * min_sequences * m / B updates, at least 20): the more clusters, the longer the memory.

Scale (`scale`):
- `raw`: the paper's a_j (its meaning changes with the model, the loss scale and the point in training);
- `snr`: a_j / se_j, the score in units of its own standard error: scale-free (multiplying every d by a constant
  leaves it unchanged) and noise-aware (a noisy estimate moves less);
- `standardized`: (a_j - mean_j a) / std_j a across the scored bases or clusters: scale-free; every update moves the
  weights by a comparable amount whatever the gradients' size.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from .state import array, plain

SCALES = ("raw", "snr", "standardized")
MIN_MEMORY = 20  # updates: the shortest memory auto_decay picks (decay 0.95)


def auto_decay(sequences_per_update: float, n_scored: int, min_sequences: float) -> float:
    """The decay at which each of `n_scored` bases or clusters keeps about 2 * min_sequences recent sequences under
    a uniform mixture: memory 1 / (1 - decay) = max(MIN_MEMORY, 2 * min_sequences * n_scored / sequences_per_update)
    updates. E.g. 16 sequences per update: 19 bases -> 0.95; 256 clusters -> 0.9961; 4,096 clusters -> 0.99976."""
    if sequences_per_update <= 0 or n_scored < 1:
        raise ValueError(f"auto_decay({sequences_per_update!r}, {n_scored!r}): expected a positive number of "
                         "sequences per update and at least one basis or cluster")
    memory = max(float(MIN_MEMORY), 2.0 * max(min_sequences, 1.0) * n_scored / sequences_per_update)
    return 1.0 - 1.0 / memory


class AlignmentStats:
    """Decayed per-cluster sums of the per-sequence alignments d_x, enough for cluster means and basis estimates.

    Eight k-vectors: sequences, their squared weights (the effective sample size), sum d, sum d^2 (cluster means and
    their standard errors), sum d/p and sum d^2/p^2 (the importance-weighted basis estimates), and sum u, sum u^2
    over the current refresh window (the noise of g_spe); plus n and n2, the decayed number of sequences and the sum
    of their squared weights, and the folded variance of g_spe's noise of the past windows.
    """

    FIELDS = ("count", "count_sq", "total", "total_sq", "weighted", "weighted_sq", "noise", "noise_sq")
    SQUARED = ("count_sq", "noise_sq")  # sums of squared weights: they age by decay^2

    def __init__(self, n_clusters: int, decay: float = 1.0):
        if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 1:
            raise ValueError(f"n_clusters = {n_clusters!r}: expected a positive number of clusters")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay = {decay!r}: expected 0 < decay <= 1 (weight kept by older sequences at each "
                             "update; 1 = a plain running mean)")
        self.n_clusters, self.decay = n_clusters, float(decay)
        for name in self.FIELDS:
            setattr(self, name, np.zeros(n_clusters))
        self.sequences = 0.0
        self.sequences_sq = 0.0
        self.noise_variance = 0.0  # the folded windows' pooled g_spe-noise variance times N^2, decayed by decay^2

    def add(self, clusters: np.ndarray, alignments: np.ndarray, probs: np.ndarray,
            noise: np.ndarray | None = None) -> None:
        """One batch: each sequence's cluster, its d_x, the probability its cluster had when it was drawn, and
        (optional) its u_x = <grad l(x), h>, h the split-half direction of g_spe's noise (module docstring)."""
        clusters = np.asarray(clusters, dtype=np.int64)
        d = np.asarray(alignments, dtype=np.float64)
        p = np.asarray(probs, dtype=np.float64)
        u = np.zeros_like(d) if noise is None else np.asarray(noise, dtype=np.float64)
        if not (clusters.shape == d.shape == p.shape == u.shape) or clusters.ndim != 1:
            raise ValueError(f"clusters {clusters.shape}, alignments {d.shape}, probs {p.shape} and noise "
                             f"{u.shape}: expected vectors with one entry per sequence")
        if len(clusters) and (clusters.min() < 0 or clusters.max() >= self.n_clusters):
            raise ValueError(f"cluster ids must lie in [0, {self.n_clusters}); got {clusters.min()}..{clusters.max()}")
        if not (np.isfinite(d).all() and np.isfinite(u).all()):
            raise ValueError("alignments or noise contain NaN or inf")
        if (p <= 0).any():
            raise ValueError("a sequence was drawn from a cluster of probability 0: expected p > 0 for every sequence")
        for name, values in (("count", np.ones_like(d)), ("count_sq", np.ones_like(d)), ("total", d),
                             ("total_sq", d * d), ("weighted", d / p), ("weighted_sq", (d / p) ** 2),
                             ("noise", u), ("noise_sq", u * u)):
            np.add.at(getattr(self, name), clusters, values)
        self.sequences += len(d)
        self.sequences_sq += len(d)

    def absorb(self, other: "AlignmentStats") -> None:
        """Add another set of statistics (e.g. the sequences seen since the last update) to these."""
        if other.n_clusters != self.n_clusters:
            raise ValueError(f"statistics over {other.n_clusters} clusters cannot join {self.n_clusters}")
        for name in self.FIELDS:
            getattr(self, name).__iadd__(getattr(other, name))
        self.sequences += other.sequences
        self.sequences_sq += other.sequences_sq
        self.noise_variance += other.noise_variance

    def merge_across_ranks(self, device: torch.device | str = "cpu") -> None:
        """Sum the statistics of every rank (one all-reduce of 8k + 2 numbers, on `device`: NCCL has no CPU path), so
        every rank holds the same statistics and computes the same scores."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        flat = torch.from_numpy(np.concatenate([getattr(self, n) for n in self.FIELDS]
                                               + [[self.sequences, self.sequences_sq]]))
        flat = flat.to(device)
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        values = flat.cpu().numpy()
        for i, name in enumerate(self.FIELDS):
            setattr(self, name, values[i * self.n_clusters:(i + 1) * self.n_clusters].copy())
        self.sequences, self.sequences_sq = float(values[-2]), float(values[-1])

    def age(self) -> None:
        """Discount everything seen so far by `decay` (called after each weight update); the squared weights by its
        square."""
        for name in self.FIELDS:
            getattr(self, name).__imul__(self.decay ** 2 if name in self.SQUARED else self.decay)
        self.sequences *= self.decay
        self.sequences_sq *= self.decay ** 2
        self.noise_variance *= self.decay ** 2

    # ---- the noise of g_spe ---------------------------------------------------------------------------------------
    def window_noise(self, bases: sp.spmatrix | None) -> np.ndarray:
        """Each centered estimate's g_spe-noise variance measured in the current refresh window, v_j^2 - sum_c
        b_jc^2 Q_c (module docstring): per basis (rows of `bases`, post-stratified as `stratified_estimates`) or
        per cluster (bases None)."""
        total = self.count.sum()
        n_items = self.n_clusters if bases is None else bases.shape[0]
        if total <= 0:
            return np.zeros(n_items)
        seen = self.count > 0
        inverse = np.divide(1.0, self.count, out=np.zeros(self.n_clusters), where=seen)
        if bases is None:
            coefficients = sp.diags(inverse).tocsr()
            unseen_mass = (~seen).astype(np.float64)  # an unseen cluster sits at the mean: no noise of its own
        else:
            bases = sp.csr_matrix(bases)
            coefficients = bases @ sp.diags(inverse)
            unseen_mass = np.asarray(bases @ (~seen).astype(np.float64)).ravel()
        # b = coefficients - (1 - m) / N on the seen clusters (sparse part, then the dense rank-one part)
        shift = (1.0 - unseen_mass) / total
        values = np.asarray(coefficients @ self.noise).ravel() - shift * self.noise.sum()
        diagonal = (np.asarray(coefficients.multiply(coefficients) @ self.noise_sq).ravel()
                    - 2.0 * shift * np.asarray(coefficients @ self.noise_sq).ravel()
                    + shift ** 2 * self.noise_sq.sum())
        return values ** 2 - diagonal

    def fold_noise(self, bases: sp.spmatrix | None, scored: np.ndarray) -> None:
        """At a refresh of g_spe: the ending window's pooled noise variance joins the decayed sum (times N^2, see
        the module docstring); U, Q restart."""
        self.noise_variance += pooled_mean(self.window_noise(bases), scored) * self.count.sum() ** 2
        self.noise = np.zeros(self.n_clusters)
        self.noise_sq = np.zeros(self.n_clusters)

    def shared_noise_variance(self, bases: sp.spmatrix | None, scored: np.ndarray) -> float:
        """The variance, pooled over the scored items, that g_spe's noise adds to every centered estimate: the
        folded windows (their sum over the current N^2) and the current one (at least 0)."""
        total = self.count.sum()
        folded = self.noise_variance / total ** 2 if total > 0 else 0.0
        return max(folded + pooled_mean(self.window_noise(bases), scored), 0.0)

    # ---- estimates ----------------------------------------------------------------------------------------------
    def cluster_means(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean d per cluster, its standard error, recent sequences); 0 where a cluster was never seen. The
        standard error counts the effective sample size N^2 / N2 of the decayed weights."""
        seen = self.count > 0
        mean = np.divide(self.total, self.count, out=np.zeros(self.n_clusters), where=seen)
        var = np.divide(self.total_sq, self.count, out=np.zeros(self.n_clusters), where=seen) - mean ** 2
        effective = np.divide(self.count ** 2, self.count_sq, out=np.zeros(self.n_clusters), where=seen)
        se = np.sqrt(np.divide(np.maximum(var, 0.0), effective, out=np.zeros(self.n_clusters), where=seen))
        return mean, se, self.count.copy()

    def basis_estimates(self, bases: sp.spmatrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ahat_j, its standard error, effective sequences in P_j's support) for every basis (row of P)."""
        bases = sp.csr_matrix(bases)
        if bases.shape[1] != self.n_clusters:
            raise ValueError(f"bases have {bases.shape[1]} clusters, the statistics {self.n_clusters}")
        support = np.asarray((bases > 0).astype(np.float64) @ self.count).ravel()
        if self.sequences <= 0:
            zeros = np.zeros(bases.shape[0])
            return zeros, zeros.copy(), support
        a = np.asarray(bases @ self.weighted).ravel() / self.sequences
        second = np.asarray(bases.multiply(bases) @ self.weighted_sq).ravel() / self.sequences
        se = np.sqrt(np.maximum(second - a ** 2, 0.0) * self.sequences_sq) / self.sequences
        return a, se, support

    def stratified_estimates(self, bases: sp.spmatrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ahat_j, its standard error, recent sequences in P_j's support), post-stratified:
        ahat_j = sum_{c seen} P_j(c) abar_c + (mass of P_j on unseen clusters) * abar, each cluster's mean weighed by
        the basis, not by how many sequences it happened to draw; an unseen cluster counts at the mean of every
        recent sequence abar (the mixture's own alignment, so it adds nothing to the centered score). The standard
        error uses the within-cluster variance pooled over the clusters (one or two sequences give no usable
        variance of their own):   se_j^2 = sigma^2 sum_{c seen} P_j(c)^2 N2_c / N_c^2."""
        bases = sp.csr_matrix(bases)
        if bases.shape[1] != self.n_clusters:
            raise ValueError(f"bases have {bases.shape[1]} clusters, the statistics {self.n_clusters}")
        seen = self.count > 0
        support = np.asarray((bases > 0).astype(np.float64) @ self.count).ravel()
        if not seen.any():
            zeros = np.zeros(bases.shape[0])
            return zeros, zeros.copy(), support
        overall = self.total.sum() / self.count.sum()
        means = np.divide(self.total, self.count, out=np.full(self.n_clusters, overall), where=seen)
        squares = self.total_sq - np.divide(self.total ** 2, self.count, out=np.zeros(self.n_clusters), where=seen)
        inverse_effective = np.divide(self.count_sq, self.count ** 2, out=np.zeros(self.n_clusters), where=seen)
        # the weighted sums of squares' expectation, sigma^2 (N_c - N2_c / N_c) per cluster (reliability weights)
        dof = float((self.count[seen] - self.count_sq[seen] / self.count[seen]).sum())
        if dof >= 1.0:
            pooled = max(squares.sum(), 0.0) / dof
        else:  # every cluster seen about once: no within-cluster spread yet, take the spread around the mean
            pooled = max(self.total_sq.sum() / self.count.sum() - overall ** 2, 0.0)
        a = np.asarray(bases @ means).ravel()
        se = np.sqrt(pooled * np.asarray(bases.multiply(bases) @ inverse_effective).ravel())
        return a, se, support

    # ---- state --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # Plain Python (torch.load's default, weights_only, refuses numpy); float64 values round-trip exactly.
        return plain({"n_clusters": self.n_clusters, "decay": self.decay, "sequences": self.sequences,
                      "sequences_sq": self.sequences_sq, "noise_variance": self.noise_variance,
                      **{name: getattr(self, name) for name in self.FIELDS}})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["n_clusters"]) != self.n_clusters or float(state["decay"]) != self.decay:
            raise ValueError(f"alignment statistics saved for {state['n_clusters']} clusters with decay "
                             f"{state['decay']}, not {self.n_clusters} and {self.decay}")
        for name in self.FIELDS:
            if name == "count_sq" and name not in state:  # saved before it was kept: its n as n2 (the old se)
                self.count_sq = array(state["count"], np.float64)
                continue
            if name in ("noise", "noise_sq") and name not in state:  # saved before they were kept: none measured
                setattr(self, name, np.zeros(self.n_clusters))
                continue
            setattr(self, name, array(state[name], np.float64))  # a list, a tensor or an array
        self.sequences = float(state["sequences"])
        self.sequences_sq = float(state.get("sequences_sq", self.sequences))
        self.noise_variance = float(state.get("noise_variance", 0.0))


def pooled_mean(values: np.ndarray, scored: np.ndarray) -> float:
    """Pure: the mean of values over the scored entries (over all when none is scored), 0 when empty."""
    values, scored = np.asarray(values, dtype=np.float64), np.asarray(scored, dtype=bool)
    chosen = values[scored] if scored.any() else values
    return float(np.mean(chosen)) if len(chosen) else 0.0


def scale_scores(scores: np.ndarray, se: np.ndarray, sequences: np.ndarray, scale: str,
                 min_sequences: float) -> np.ndarray:
    """Scores as the update uses them: 0 for whatever has fewer than `min_sequences` recent sequences (it does not
    move on noise), the rest raw, divided by their standard error (`snr`), or standardized across the scored ones
    (`standardized`)."""
    if scale not in SCALES:
        raise ValueError(f"scale = {scale!r}: expected one of {', '.join(SCALES)}")
    scores, se = np.asarray(scores, dtype=np.float64), np.asarray(se, dtype=np.float64)
    scored = np.asarray(sequences) >= min_sequences
    out = np.zeros_like(scores)
    if scale == "raw":
        out[scored] = scores[scored]
    elif scale == "snr":
        ok = scored & (se > 0)
        out[ok] = scores[ok] / se[ok]
    elif scored.sum() > 1:
        values = scores[scored]
        spread = values.std()
        out[scored] = (values - values.mean()) / spread if spread > 0 else 0.0
    return out
