"""DoGE's domain-weight update (pure numpy), the baseline DGA is built on.

Fan, Pagliardini, Jaggi, "DoGE: Domain Reweighting with Generalization Estimation" (arXiv 2310.15393, ICML 2024),
Algorithm 1, as its reference implementation (github.com/Olivia-fsm/DoGE, `src/trainer.py`,
`DoGETrainer.update_domain_weights_distributed`) computes it in the out-of-domain setting, where the target is a
domain of its own (here the specialized set, as DGA's):

    g_j <- clip(g_j, G),  g_t <- clip(g_t, G)          each domain's and the target's gradient clipped to norm G
                                                        (the trainer's max_grad_norm; 1.0 in the OOD configs)
    W_j  = <g_j, g_t>                                   the generalization estimate of domain j
    s_j  = lr_t * W_j / (mean_i ||g_i|| + 1e-6)         lr_t: the current learning rate; the mean over the
                                                        training domains' (clipped) gradient norms
    s_j <- clip(s_j, lr_t * dw_min, lr_t * dw_max)      dw_min = 0, dw_max = 5 in every published config
    alpha <- softmax(log alpha + s / mu)                mu = 0.05 in the OOD configs (0.01 universal)

with no EMA and no smoothing (the configs' reweight_eps = 0). Clipping a gradient g to norm G multiplies it by
f = min(1, G / (||g|| + 1e-6)) (torch.nn.utils.clip_grad_norm_), so the clipped dot products and norms follow from
the unclipped ones and the norms: f_j f_t W_j and f_j ||g_j||, with no gradient kept.

Scale: multiplying the loss by c multiplies W_j by c^2 and the norms by c, so s_j (before the bound) by c: the
normalization by the mean norm removes one factor of the loss scale, not both. With gradient clipping, once every
gradient is longer than G (the usual case in LM training) the clipped gradients have norm G whatever c, and the
update does not depend on the loss scale at all.

The differences from the reference, all of them deliberate, are listed in `DoGEStrategy`'s docstring.
"""
from __future__ import annotations

import numpy as np

from .dga import exponentiated_update

NORM_EPS = 1e-6  # the reference's mean_norm + 1e-6 and torch's clip_grad_norm_ max_norm / (norm + 1e-6)


def check_doge_params(mu: float, clip_min: float, clip_max: float, grad_clip: float, every: int) -> None:
    if isinstance(mu, bool) or not (isinstance(mu, (int, float)) and mu > 0 and np.isfinite(mu)):
        raise ValueError(f"mu = {mu!r}: expected a positive Bregman coefficient (DoGE's step is 1 / mu; the paper "
                         "uses 0.05 out of domain, 0.01 universal)")
    for name, value in (("clip_min", clip_min), ("clip_max", clip_max)):
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and np.isfinite(value)):
            raise ValueError(f"{name} = {value!r}: expected a finite bound on the scores in units of the learning "
                             "rate (the paper: 0 and 5)")
    if clip_min > clip_max:
        raise ValueError(f"clip_min = {clip_min!r} > clip_max = {clip_max!r}: expected clip_min <= clip_max")
    if isinstance(grad_clip, bool) or not (isinstance(grad_clip, (int, float)) and grad_clip >= 0
                                           and np.isfinite(grad_clip)):
        raise ValueError(f"grad_clip = {grad_clip!r}: expected the norm each gradient is clipped to, >= 0 (0: no "
                         "clipping; the paper's out-of-domain runs: 1.0)")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every = {every!r}: expected a positive number of steps between updates")


def doge_scores(alignments: np.ndarray, basis_norms: np.ndarray, target_norm: float, lr: float,
                clip_min: float, clip_max: float, grad_clip: float) -> np.ndarray:
    """s_j = clip(lr * f_j f_t a_j / (mean_i f_i ||g_i|| + 1e-6), lr * clip_min, lr * clip_max), with f the factor
    clipping a gradient to norm `grad_clip` (1 everywhere when grad_clip = 0, as the reference's max_grad_norm)."""
    a = np.asarray(alignments, dtype=np.float64)
    norms = np.asarray(basis_norms, dtype=np.float64)
    if grad_clip > 0:
        factors = np.minimum(1.0, grad_clip / (norms + NORM_EPS))
        a = a * factors * min(1.0, grad_clip / (float(target_norm) + NORM_EPS))
        norms = norms * factors
    scores = lr * a / (norms.mean() + NORM_EPS)
    return np.clip(scores, lr * clip_min, lr * clip_max)


def doge_update(weights: np.ndarray, alignments: np.ndarray, basis_norms: np.ndarray, target_norm: float,
                lr: float, mu: float, clip_min: float, clip_max: float,
                grad_clip: float) -> tuple[np.ndarray, np.ndarray, bool]:
    """One DoGE step: (new weights, the scores s that moved them, whether it was skipped). Non-finite inputs (a
    NaN loss, an infinite norm) skip the update and keep the weights, as DGA does; the scores are then NaN."""
    weights = np.asarray(weights, dtype=np.float64)
    alignments = np.asarray(alignments, dtype=np.float64)
    basis_norms = np.asarray(basis_norms, dtype=np.float64)
    if alignments.shape != weights.shape or basis_norms.shape != weights.shape:
        raise ValueError(f"alignments {alignments.shape} and norms {basis_norms.shape}: expected {weights.shape}, "
                         "one per basis")
    inputs = np.r_[alignments, basis_norms, target_norm, lr]
    if not np.isfinite(inputs).all():
        return weights.copy(), np.full(len(weights), np.nan), True
    if lr < 0:
        raise ValueError(f"learning rate {lr!r}: expected >= 0")
    scores = doge_scores(alignments, basis_norms, target_norm, lr, clip_min, clip_max, grad_clip)
    # softmax(log alpha + s / mu) is normalize(alpha * exp(s / mu)): DGA's exponentiated update with eta = 1 / mu.
    return exponentiated_update(weights, scores, 1.0 / mu), scores, False
