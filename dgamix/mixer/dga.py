"""Dynamic Gradient Alignment: the weight update (pure numpy) and the exact alignment scores (torch).

Update, every T_r steps, from alignment scores a_j = <grad l(theta; x_j), grad l(theta; y)>:
    alpha_new = normalize(alpha * exp(eta * a))        computed in log space: no overflow for large eta * a
    alpha     = (1 - beta) * alpha + beta * alpha_new   the EMA variant; beta = 1 is plain DGA
Non-finite scores skip the update (the caller logs it); the weights never leave the simplex.
"""
from __future__ import annotations

from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np
import torch

from .distributed import all_reduce_sum_, is_distributed, rank_and_world_size


def check_dga_params(eta: float, beta: float, every: int) -> None:
    if not (isinstance(eta, (int, float)) and eta > 0 and np.isfinite(eta)):
        raise ValueError(f"eta = {eta!r}: expected a positive number (anchored rule: log-odds per unit of "
                         "relative gain; paper's rule: the step size of the update)")
    if not (isinstance(beta, (int, float)) and 0 < beta <= 1):
        raise ValueError(f"beta = {beta!r}: expected 0 < beta <= 1 (EMA weight of the new alpha; 1 = no EMA)")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every = {every!r}: expected a positive number of steps between updates (T_r)")


def exponentiated_update(weights: np.ndarray, scores: np.ndarray, eta: float) -> np.ndarray:
    """normalize(weights * exp(eta * scores)) in log space. Zero weights stay zero."""
    weights = np.asarray(weights, dtype=np.float64)
    with np.errstate(divide="ignore"):
        logits = np.log(weights) + eta * np.asarray(scores, dtype=np.float64)
    logits -= logits[np.isfinite(logits)].max()
    new = np.exp(logits)
    return new / new.sum()


def dga_update(weights: np.ndarray, scores: np.ndarray, eta: float, beta: float = 1.0) -> tuple[np.ndarray, bool]:
    """One DGA step. Returns (new weights, whether the update was skipped because a score was NaN or inf)."""
    scores = np.asarray(scores, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if scores.shape != weights.shape:
        raise ValueError(f"scores have shape {scores.shape}, expected {weights.shape}: one score per basis")
    if not np.isfinite(scores).all():
        return weights.copy(), True
    new = exponentiated_update(weights, scores, eta)
    blended = (1.0 - beta) * weights + beta * new
    return blended / blended.sum(), False


# ---- the anchored rule ---------------------------------------------------------------------------------------------
# The paper's update compounds: log alpha_T = log alpha_0 + eta * sum_t s_t, so any persistent gap (or noise, as a
# random walk) drives the weights to a vertex of the simplex. The anchored rule maximises the paper's linearised
# objective inside a KL trust region around the starting weights alpha_0,
#     max_alpha <alpha, s> - (1 / eta) KL(alpha || alpha_0)   =>   alpha = softmax(log alpha_0 + eta * s),
# and runs it on an average of the scores, s_bar_t = (1 - beta) s_bar_{t-1} + beta s_t, not a sum: without signal
# s_bar -> 0 and the weights stay near alpha_0; a real advantage moves them by a bounded amount, and every weight
# stays >= alpha_0_j exp(-eta * range(s)), so every basis keeps being sampled and scored.
#
# Scores with a unit (`relative_gains`): s_j = kappa_j (a_j - sum_i alpha_i a_i) / G, where G estimates
# ||grad L_spe||^2 without bias (the dot product of the gradients of two halves of the target batch). s_j is the
# gain of a step on basis j over a step on the current mixture, as a fraction of a target step's own gain:
# invariant to the loss's and the parameters' scale, and to first order to batch size and rank count. Centering
# removes the component common to every basis (which the softmax ignores anyway, but which would otherwise leak
# into unscored items). kappa_j = tau^2 / (tau^2 + (se_j / G)^2) shrinks a noisy estimate toward 0 (a normal prior of
# scale tau on the relative gain). eta is then a budget in log-odds: two bases whose relative gains differ by Delta
# end exp(eta * Delta) apart, so eta = ln(R) / Delta allows a factor R (R = 20 at Delta = 0.5: eta = 6).
RULES = ("anchored", "paper")


def relative_gains(alignments: np.ndarray, weights: np.ndarray, gain: float,
                   standard_errors: np.ndarray | None = None, tau: float = 0.5,
                   scored: np.ndarray | None = None, center: float | None = None) -> np.ndarray:
    """Pure: s_j = kappa_j (a_j - mixture mean) / G over the scored items; unscored items sit at the mixture mean
    (score 0). The mixture mean is `center` when given (a direct, low-noise estimate of the current mixture's own
    alignment), else the scored items' alignments weighed by `weights` (the weights in force): with noisy
    estimates, prefer `center`, since the noise of a heavy item's estimate would shift every other item's score
    by an amount its shrinkage does not share. NaN everywhere when G is not a positive finite number or a scored
    alignment is not finite: the update is skipped."""
    a = np.asarray(alignments, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    scored = np.ones(len(a), dtype=bool) if scored is None else np.asarray(scored, dtype=bool)
    if not (np.isfinite(gain) and gain > 0) or not np.isfinite(a[scored]).all():
        return np.full(len(a), np.nan)
    out = np.zeros(len(a))
    if not scored.any():
        return out
    mass = w[scored].sum()
    if center is not None:
        mean = float(center)
    else:
        mean = (w[scored] * a[scored]).sum() / mass if mass > 0 else a[scored].mean()
    out[scored] = (a[scored] - mean) / gain
    if standard_errors is not None:
        relative_se = np.asarray(standard_errors, dtype=np.float64) / gain
        kappa = np.where(np.isfinite(relative_se), tau ** 2 / (tau ** 2 + relative_se ** 2), 1.0)
        out *= kappa
    return out


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) in nats (0 log 0 = 0)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    mask = p > 0
    return float((p[mask] * (np.log(p[mask]) - np.log(q[mask]))).sum())


def anchored_weights(prior: np.ndarray, scores: np.ndarray, eta: float, kl_cap: float | None = None) -> np.ndarray:
    """Pure: softmax(log prior + eta * scores) (zero prior weights stay zero); with `kl_cap`, the step is shortened
    (eta scaled down, by bisection) until KL(alpha || prior) <= kl_cap nats."""
    prior = np.asarray(prior, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)

    def at(step: float) -> np.ndarray:
        return exponentiated_update(prior, scores, step)

    new = at(eta)
    if kl_cap is None or kl_divergence(new, prior) <= kl_cap:
        return new
    low, high = 0.0, eta
    for _ in range(60):
        middle = (low + high) / 2
        if kl_divergence(at(middle), prior) > kl_cap:
            high = middle
        else:
            low = middle
    return at(low)


def average_scores(previous: np.ndarray | None, scores: np.ndarray, beta: float) -> np.ndarray:
    """Pure: s_bar = (1 - beta) s_bar_prev + beta s (the first scores as they are)."""
    scores = np.asarray(scores, dtype=np.float64)
    return scores.copy() if previous is None else (1.0 - beta) * np.asarray(previous, dtype=np.float64) + beta * scores


def averaged_variance(previous: np.ndarray | None, variance: np.ndarray, beta: float) -> np.ndarray:
    """Pure: the variance of `average_scores`'s average when each update's scores carry independent noise of
    `variance`: (1 - beta)^2 v_prev + beta^2 v (the first as it is). With beta < 1 it falls toward
    beta / (2 - beta) of one update's: averaging over updates lets a persistent signal through the shrinkage."""
    variance = np.asarray(variance, dtype=np.float64)
    if previous is None:
        return variance.copy()
    return (1.0 - beta) ** 2 * np.asarray(previous, dtype=np.float64) + beta ** 2 * variance


def shrink(scores: np.ndarray, variance: np.ndarray, tau: float) -> np.ndarray:
    """Pure: kappa * s with kappa = tau^2 / (tau^2 + variance), the posterior mean of a relative gain under a normal
    prior of scale tau. The shrunk noise never exceeds tau / 2 (at variance tau^2), so without signal eta * tau / 2
    bounds how far, in log-odds, any weight strays from alpha_0."""
    variance = np.asarray(variance, dtype=np.float64)
    return np.asarray(scores, dtype=np.float64) * tau ** 2 / (tau ** 2 + variance)


def _dtensor_type() -> type | None:
    """torch's DTensor class (FSDP2's sharded parameters), wherever this torch version keeps it."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


def sharded_parameters(params: Sequence[torch.nn.Parameter]) -> bool:
    """Whether the parameters are sharded DTensors (torch.distributed.fsdp.fully_shard, FSDP2). Only a 1-D mesh over
    every rank is supported: on a 2-D (replicate, shard) mesh each shard lives on several ranks, and summing the
    local dot products over all ranks would count it that many times."""
    dtensor = _dtensor_type()
    sharded = [p for p in params if dtensor is not None and isinstance(p, dtensor)]
    for p in sharded:
        mesh = p.device_mesh
        if mesh.ndim != 1 or mesh.size() != torch.distributed.get_world_size():
            raise ValueError(f"a parameter is sharded over a device mesh of shape {tuple(mesh.shape)} with "
                             f"{torch.distributed.get_world_size()} ranks: DGA supports FSDP2 over one 1-D mesh of "
                             "every rank (fully_shard without replication), where each shard lives on one rank")
    return bool(sharded)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; a plain tensor as is."""
    dtensor = _dtensor_type()
    return tensor.to_local() if dtensor is not None and isinstance(tensor, dtensor) else tensor


def _grads_by_backward(loss: torch.Tensor, params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor | None]:
    """The local gradient shards of FSDP2-sharded parameters. torch.autograd.grad cannot reach them (FSDP computes
    with unsharded copies and reduce-scatters into the shards' .grad in its backward hooks; autograd.grad returns
    None for every shard), so this runs loss.backward() and reads .grad, restoring each .grad as it was: the
    training gradients are untouched. FSDP averages the ranks' gradients in that reduce-scatter."""
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        loss.backward()
        return [None if p.grad is None else _local(p.grad) for p in params]
    finally:
        for p, grad in zip(params, saved):
            p.grad = grad


def _flat_grad(loss: torch.Tensor, params: Sequence[torch.nn.Parameter], sharded: bool = False) -> torch.Tensor:
    if not loss.requires_grad:
        raise ValueError("the loss does not require grad: the alignment needs a differentiable loss of the model's "
                         "parameters (is the model in torch.no_grad() or are all parameters frozen?)")
    grads = _grads_by_backward(loss, params) if sharded else torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(_local(p))).reshape(-1).float()
                      for g, p in zip(grads, params)])


def mean_gradient(loss_fn: Callable[[object], torch.Tensor], micro_batches: Iterable[object],
                  params: Sequence[torch.nn.Parameter], loss_multiplier: float = 1.0) -> torch.Tensor:
    """Gradient of the mean loss over micro-batches, flattened in fp32 (one buffer, accumulated in place), of
    `loss_multiplier` times the loss. On FSDP2-sharded parameters: this rank's shards of the gradient, averaged
    across ranks by FSDP's own reduce-scatter."""
    sharded = sharded_parameters(params)
    total, count = None, 0
    for batch in micro_batches:
        loss = loss_fn(batch)
        g = _flat_grad(loss * loss_multiplier if loss_multiplier != 1.0 else loss, params, sharded)
        total = g if total is None else total.add_(g)
        count += 1
    if total is None:
        raise ValueError("no micro-batch given: expected at least one batch")
    return total.div_(count)


def _share(value: float | None, name: str) -> float:
    """This rank's share of a batch drawn across ranks; default 1 / world size (equal slices)."""
    world = rank_and_world_size()[1]
    if value is None:
        return 1.0 / world
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} = {value!r}: expected this rank's share of the batch, 0 < share <= 1 (its number "
                         "of sequences over the batch's total across ranks)")
    return float(value)


def exact_alignment(loss_fn: Callable[[object], torch.Tensor], params: Sequence[torch.nn.Parameter],
                    basis_batches: Sequence[Sequence[object]], target_batches: Sequence[object],
                    basis_share: float | None = None, target_share: float | None = None,
                    **_: object) -> np.ndarray:
    """a_j = <grad L(x_j), grad L(y)>: the target gradient is held once; each basis gradient is reduced to its dot
    product as soon as it exists, so memory grows by one gradient buffer, not by the number of bases.

    Under torch.distributed each rank passes its own slice of every batch (DGAStrategy shards the alignment draw):
    `basis_share` and `target_share` are the fractions of each basis's and of the target's sequences this rank
    holds (default 1 / world size, equal slices). The gradient of a batch is the share-weighted sum of the ranks'
    slice gradients, so the target gradient is reduced once (SUM of share * local) and, since
    <sum_r s_r g_r, t> = sum_r s_r <g_r, t>, the basis gradients never travel: only the m partial scores are
    summed. Every rank ends with identical scores, those of one process over the union of the slices.
    On FSDP2-sharded parameters (fully_shard) FSDP's backward already averages the ranks' gradients into each
    rank's shard: the scores are the dot products of the local shards, summed across ranks.
    """
    return _exact(loss_fn, params, basis_batches, target_batches, basis_share, target_share, with_norms=False)[0][0]


def exact_alignment_with_norms(loss_fn: Callable[[object], torch.Tensor], params: Sequence[torch.nn.Parameter],
                               basis_batches: Sequence[Sequence[object]], target_batches: Sequence[object],
                               basis_share: float | None = None, target_share: float | None = None,
                               ) -> tuple[np.ndarray, np.ndarray, float]:
    """(a, ||grad L(x_j)|| per basis, ||grad L(y)||): the exact scores (bit for bit those of `exact_alignment`)
    and the gradient norms DoGE normalizes and clips with, from the same gradients (no extra backward).

    The norms are those of the whole batches' gradients. Under FSDP2 the squared norms of the local shards are
    summed across ranks with the scores (cheap). Under DDP (unsharded parameters) each rank holds only its slice's
    basis gradient, and the norm of a sum is no sum of norms: each basis gradient is all-reduced (share-weighted)
    for its norm, one model-sized reduction per basis, which the scores alone never need."""
    scores, basis_norms, target_norm = _exact(loss_fn, params, basis_batches, target_batches, basis_share,
                                              target_share, with_norms=True)
    return scores[0], basis_norms, float(target_norm)


def _exact(loss_fn: Callable[[object], torch.Tensor], params: Sequence[torch.nn.Parameter],
           basis_batches: Sequence[Sequence[object]], target_batches: Sequence[object] | None,
           basis_share: float | None, target_share: float | None, with_norms: bool,
           targets: Sequence[torch.Tensor] | None = None) -> tuple[np.ndarray, np.ndarray | None, float | None]:
    """(scores, basis norms, target norm). Scores have one row per target direction: the gradient of
    `target_batches`, or each of `targets` when given (every basis gradient is then dotted with all of them: one
    backward per basis whatever their number)."""
    params = [p for p in params if p.requires_grad]
    basis_share = _share(basis_share, "basis_share")
    sharded = sharded_parameters(params)
    if targets is None:
        targets = [_target_gradient(loss_fn, params, target_batches, target_share)]
    world = rank_and_world_size()[1]
    device = targets[0].device
    # On the gradient's device: NCCL cannot reduce CPU tensors; one transfer at the end instead of one per basis.
    partial = torch.zeros(len(targets), len(basis_batches), dtype=torch.float64, device=device)
    # Squared norms: per-rank partial sums under FSDP2 (reduced with the scores), else already whole-batch values.
    squares = torch.zeros(len(basis_batches), dtype=torch.float64, device=device)
    for j, batches in enumerate(basis_batches):
        if sharded:  # FSDP averages over ranks with equal weights: scaling by share * world makes it share-weighted
            g = mean_gradient(loss_fn, batches, params, loss_multiplier=basis_share * world)
            for t, target in enumerate(targets):
                partial[t, j] = torch.dot(g, target)
            if with_norms:
                squares[j] = torch.dot(g, g)
        else:
            g = mean_gradient(loss_fn, batches, params)
            for t, target in enumerate(targets):
                partial[t, j] = basis_share * torch.dot(g, target).double()
            if with_norms:
                whole = all_reduce_sum_(g.mul_(basis_share)) if is_distributed() else g
                squares[j] = torch.dot(whole, whole).double()
        del g
    scores = all_reduce_sum_(partial).cpu().numpy()
    if not with_norms:
        return scores, None, None
    target_square = torch.dot(targets[0], targets[0]).double().reshape(1)
    if sharded:  # both are sums over the ranks' shards
        all_reduce_sum_(squares)
        all_reduce_sum_(target_square)
    return scores, squares.sqrt().cpu().numpy(), float(target_square.sqrt())


def _target_gradient(loss_fn: Callable[[object], torch.Tensor], params: Sequence[torch.nn.Parameter],
                     target_batches: Sequence[object], share: float | None = None) -> torch.Tensor:
    """The specialized gradient g (fp32, flat) over every rank's slice of the target batch: the share-weighted sum
    of the ranks' gradients, reduced on the gradient's own device. On FSDP2-sharded parameters, this rank's shard
    of g (FSDP's backward does the reduction)."""
    share = _share(share, "target_share")
    if sharded_parameters(params):
        return mean_gradient(loss_fn, target_batches, params, loss_multiplier=share * rank_and_world_size()[1])
    target = mean_gradient(loss_fn, target_batches, params)
    if is_distributed():
        all_reduce_sum_(target.mul_(share))
    return target


class SplitAlignment(NamedTuple):
    """Alignments measured on two halves of every batch (`split_alignment`)."""

    alignments: np.ndarray  # a_j, from the whole batches (the halves' mean)
    standard_errors: np.ndarray  # of each a_j minus the mixture's own, from the halves' disagreement
    gain: float  # G = <g1, g2>: an unbiased estimate of ||grad L_spe||^2


def _halves(batches: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [b[: len(b) // 2] for b in batches], [b[len(b) // 2:] for b in batches]


def pooled_standard_errors(basis_halves: np.ndarray, target_halves: np.ndarray | None, weights: np.ndarray
                           ) -> np.ndarray:
    """Pure: the standard error of each centered score a_j - sum_i alpha_i a_i, pooled over the bases.

    `basis_halves` (2, m): the alignments of the two halves of each basis batch with the same g; their difference
    is the basis sampling noise alone, and a_j (their mean) has a quarter of its variance; centered with the
    weights, as the scores are. `target_halves` (2, m):
    the alignments of the whole basis batches with each half's target gradient g1 and g2; their difference is the
    noise of g_spe, which every basis shares (the centering removes its common part, so it is centered first) and
    which more basis sequences never average away. One half-split gives one degree of freedom per basis: the
    variance is pooled over the bases (every one gets the same standard error), assuming the bases are about
    equally noisy, which is what a no-signal test needs: no basis's score is let through by a lucky small
    estimate of its own noise."""
    basis_halves = np.asarray(basis_halves, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)

    def centered(difference: np.ndarray) -> np.ndarray:  # the noise of a_j - sum_i alpha_i a_i, not of a_j
        return difference - np.dot(w, difference) / w.sum()

    variance = centered(basis_halves[0] - basis_halves[1]) ** 2 / 4.0
    if target_halves is not None:
        variance = variance + centered(np.asarray(target_halves[0] - target_halves[1], dtype=np.float64)) ** 2 / 4.0
    return np.full(basis_halves.shape[1], np.sqrt(variance.mean()))


def split_alignment(estimator: str, loss_fn: Callable[[object], torch.Tensor],
                    params: Sequence[torch.nn.Parameter], basis_batches: Sequence[Sequence[torch.Tensor]],
                    target_batches: Sequence[torch.Tensor], weights: np.ndarray, basis_share: float | None = None,
                    target_share: float | None = None, **options: object) -> SplitAlignment:
    """The anchored rule's measurement: every batch (each rank's slice of it) is cut in two halves.

    The target halves give g1 and g2 (two half-size backwards, the cost of one): g = (g1 + g2) / 2 is the target
    gradient and G = <g1, g2> its unit (the halves' noise is independent, so G is unbiased for ||grad L_spe||^2).
    Each basis's halves are scored along g by `estimator` (the same sequences as one whole batch: the same
    cost); the exact estimator also dots every basis gradient with g1 and g2 (free: no extra backward), which
    measures the part of the scores' noise that comes from g_spe. Under torch.distributed the halves' gradients
    are reduced as the whole batch's. Every rank's slice of every batch needs two sequences."""
    params = [p for p in params if p.requires_grad]
    first_target, second_target = _halves(target_batches)
    if min(len(b) for b in first_target) < 1 or min(len(b) for batches in basis_batches for b in batches) < 2:
        raise ValueError("the anchored rule cuts every alignment batch in two halves: expected >= 2 sequences of "
                         "the target and of every basis per rank and micro-batch")
    first = _target_gradient(loss_fn, params, first_target, target_share)
    second = _target_gradient(loss_fn, params, second_target, target_share)
    dot = torch.dot(first.double(), second.double()).reshape(1)
    if sharded_parameters(params):  # local shards: the dot product is their sum
        all_reduce_sum_(dot)
    target = (first + second).mul_(0.5)
    halves = list(zip(*[_halves(batches) for batches in basis_batches]))
    if estimator == "exact":  # rows: g, g1, g2
        by_half = [_exact(loss_fn, params, list(half), None, basis_share, target_share, with_norms=False,
                          targets=[target, first, second])[0] for half in halves]
        basis_halves = np.stack([rows[0] for rows in by_half])
        target_halves = (by_half[0][1:] + by_half[1][1:]) / 2.0
    else:
        del first, second
        basis_halves = np.stack([ESTIMATORS[estimator](loss_fn, params, list(half), None, target=target,
                                                       basis_share=basis_share, target_share=target_share,
                                                       **options) for half in halves])
        target_halves = None
    alignments = basis_halves.mean(axis=0)
    return SplitAlignment(alignments, pooled_standard_errors(basis_halves, target_halves, weights), float(dot))


def _refuse_sharded(params: Sequence[torch.nn.Parameter], estimator: str) -> None:
    if sharded_parameters(params):
        raise ValueError(f"the {estimator} estimator does not support FSDP-sharded (DTensor) parameters: it moves or "
                         "swaps whole parameters; use estimator='exact' under fully_shard")


def _sum_across_ranks(values: np.ndarray, device: torch.device) -> np.ndarray:
    """The sum over ranks of per-rank partial scores, reduced on `device` (the gradient's: NCCL has no CPU path)."""
    if not is_distributed():
        return values
    reduced = torch.as_tensor(np.ascontiguousarray(values, dtype=np.float64)).to(device)
    return all_reduce_sum_(reduced).cpu().numpy()


def per_basis_means(value_fn: Callable[[torch.Tensor], torch.Tensor], basis_batches: Sequence[Sequence[torch.Tensor]],
                    chunk: int) -> np.ndarray:
    """Mean over each basis's sequences of a per-sequence value, all bases batched together: the sequences of every
    basis are concatenated and evaluated `chunk` at a time (a few large forwards instead of m small ones)."""
    owners = torch.cat([torch.full((len(b),), j) for j, batches in enumerate(basis_batches) for b in batches])
    sequences = torch.cat([b for batches in basis_batches for b in batches])
    values = torch.cat([value_fn(sequences[i:i + chunk]).detach().double().cpu()
                        for i in range(0, len(sequences), chunk)])
    sums = torch.zeros(len(basis_batches), dtype=torch.float64).index_add_(0, owners, values)
    return (sums / torch.bincount(owners, minlength=len(basis_batches)).double()).numpy()


def finite_difference_alignment(loss_fn: Callable[[object], torch.Tensor], params: Sequence[torch.nn.Parameter],
                                basis_batches: Sequence[Sequence[object]], target_batches: Sequence[object],
                                sequence_loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                                chunk: int = 256, step_norm: float = 1e-2, basis_share: float | None = None,
                                target_share: float | None = None, target: torch.Tensor | None = None,
                                **_: object) -> np.ndarray:
    """a_j estimated as the central difference of l(.; x_j) along g = grad L(y):
    (l(theta + eps g) - l(theta - eps g)) / (2 eps), with eps = step_norm / ||g||. One backward pass (the target)
    and two no-grad forward passes over the bases' sequences instead of one backward per basis. With
    `sequence_loss_fn` (tokens -> per-sequence losses) all bases are batched together, `chunk` sequences per forward.
    Parameters are restored bit for bit.

    Under torch.distributed each rank passes its slices (`basis_share`, `target_share` as for the exact scores):
    the target gradient is reduced first, so every rank steps along the same g, and the share-weighted partial
    scores after.
    """
    params = [p for p in params if p.requires_grad]
    _refuse_sharded(params, "finite-difference")
    basis_share = _share(basis_share, "basis_share")
    if target is None:  # else the caller's g, already reduced across ranks (the anchored rule's mean of two halves)
        target = _target_gradient(loss_fn, params, target_batches, target_share)
    norm = float(target.norm())
    if norm == 0.0 or not np.isfinite(norm):
        return np.zeros(len(basis_batches)) if norm == 0.0 else np.full(len(basis_batches), np.nan)
    eps = step_norm / norm
    saved = [p.detach().clone() for p in params]
    pieces = torch.split(target, [p.numel() for p in params])

    def shift(sign: float) -> None:
        for p, original, piece in zip(params, saved, pieces):
            p.copy_(original + sign * eps * piece.view_as(p).to(p.dtype))

    def losses() -> np.ndarray:
        if sequence_loss_fn is not None:
            return per_basis_means(sequence_loss_fn, basis_batches, chunk)
        return np.array([np.mean([float(loss_fn(b)) for b in batches]) for batches in basis_batches])

    with torch.no_grad():
        try:
            shift(+1.0)
            plus = losses()
            shift(-1.0)
            minus = losses()
        finally:
            for p, original in zip(params, saved):
                p.copy_(original)
    return _sum_across_ranks(basis_share * (plus - minus) / (2 * eps), target.device)


class _LossOf(torch.nn.Module):
    """Wraps a loss closure over `module` so that torch.func.functional_call can swap the module's parameters."""

    def __init__(self, module: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.fn(batch)


def forward_mode_alignment(loss_fn: Callable[[object], torch.Tensor], params: Sequence[torch.nn.Parameter],
                           basis_batches: Sequence[Sequence[object]], target_batches: Sequence[object],
                           module: torch.nn.Module | None = None,
                           sequence_loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                           chunk: int = 256, basis_share: float | None = None,
                           target_share: float | None = None, target: torch.Tensor | None = None,
                           **_: object) -> np.ndarray:
    """a_j as the directional derivative of l(.; x_j) along g = grad L(y) by forward-mode AD (torch.func.jvp):
    exact up to float rounding, one forward-mode pass per batch instead of a backward. `module` is the model the
    loss closures call (its parameters are swapped functionally, never modified). Attention runs on the math SDPA
    kernel here, the only one with forward-mode derivatives. Under torch.distributed: as the finite differences."""
    if module is None:
        raise ValueError("the forward-mode estimator needs the model: pass module=<the nn.Module the loss calls>")
    from torch.func import functional_call, jvp
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = [p for p in params if p.requires_grad]
    _refuse_sharded(params, "forward-mode")
    basis_share = _share(basis_share, "basis_share")
    if target is None:  # else the caller's g, already reduced across ranks (the anchored rule's mean of two halves)
        target = _target_gradient(loss_fn, params, target_batches, target_share)
    names = {id(p): name for name, p in module.named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError(f"parameters {missing[:5]} are not parameters of the given module")
    primals = {f"module.{names[id(p)]}": p.detach() for p in params}
    tangents = {f"module.{names[id(p)]}": piece.view_as(p).to(p.dtype)
                for p, piece in zip(params, torch.split(target, [p.numel() for p in params]))}
    fn = sequence_loss_fn if sequence_loss_fn is not None else loss_fn
    wrapper = _LossOf(module, fn)

    def directional(batch: torch.Tensor) -> torch.Tensor:
        return jvp(lambda p: functional_call(wrapper, p, (batch,)), (primals,), (tangents,))[1]

    with sdpa_kernel([SDPBackend.MATH]), torch.no_grad():
        if sequence_loss_fn is not None:
            scores = per_basis_means(directional, basis_batches, chunk)
        else:
            scores = np.array([np.mean([float(directional(b)) for b in batches]) for batches in basis_batches])
    return _sum_across_ranks(basis_share * scores, target.device)


ESTIMATORS: dict[str, Callable[..., np.ndarray]] = {
    "exact": exact_alignment, "finite_difference": finite_difference_alignment, "forward": forward_mode_alignment}
