"""Per-sequence inner products <grad_theta l(theta; x), g> of one layer, from its input and output gradient.

Pure tensor math, no hooks and no state: `inbatch.py` feeds these functions what a training backward already has.
Every function takes a layer's input (a, token ids or the LayerNorm input) and delta, the gradient of the
backpropagated loss with respect to the layer's output, both shaped (B, ..., features) with the sequence on dim 0,
and the layer's block of the target gradient g. It returns, per sequence, sum over its tokens t of the term below,
shape (B,), in fp32 whatever the activations' dtype (bf16 products would lose the small differences between
sequences that the scores are about):

    Linear     y = a W^T + b      delta_t^T G_W a_t + delta_t . G_b
    Conv1D     y = a W + b         the Linear term with G_W^T (transformers' GPT-2 layers: W is (d_in, d_out))
    Embedding  e = E[id]           delta_t . G_E[id_t]               (rows at padding_idx get no gradient)
    LayerNorm  y = gamma * x^ + beta   (delta_t * x^_t) . G_gamma + delta_t . G_beta
    RMSNorm    y = w * x / rms(x)  (delta_t * x^_t) . G_w             (x^_t = x_t / sqrt(mean(x_t^2) + eps))

The result is in the scale of delta: the caller divides by the weight each sequence's loss had in the loss that
was backpropagated.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sequence_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum over everything but dim 0 of x * y, shape (B,): a batched dot product, with no (B, ..., D) temporary."""
    b = x.shape[0]
    return torch.einsum("bk,bk->b", x.reshape(b, -1), y.reshape(b, -1))


def _bias_term(delta: torch.Tensor, bias_grad: torch.Tensor) -> torch.Tensor:
    b = delta.shape[0]
    return delta.reshape(b, -1, delta.shape[-1]).sum(dim=1) @ bias_grad


def linear_dots(a: torch.Tensor, delta: torch.Tensor, weight_grad: torch.Tensor | None,
                bias_grad: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sequence sum_t delta_t^T G_W a_t + delta_t . G_b for y = a W^T + b. G_W (d_out, d_in) multiplies the
    narrower side: (delta G_W) . a when d_out >= d_in (an output head), (a G_W^T + G_b) . delta otherwise, so the
    temporary is (B, T, min(d_in, d_out)); the cost is one matmul as large as the layer's forward either way."""
    a, delta = a.float(), delta.float()
    if weight_grad is None:
        return _bias_term(delta, bias_grad) if bias_grad is not None else delta.new_zeros(delta.shape[0])
    d_out, d_in = weight_grad.shape
    if d_out >= d_in:
        total = per_sequence_dot(delta @ weight_grad, a)
        return total + _bias_term(delta, bias_grad) if bias_grad is not None else total
    return per_sequence_dot(F.linear(a, weight_grad, bias_grad), delta)


def low_rank_linear_dots(a: torch.Tensor, delta: torch.Tensor, us: torch.Tensor, v: torch.Tensor,
                         bias_grad: torch.Tensor | None = None) -> torch.Tensor:
    """linear_dots with G_W ~ us v^T (us: (d_out, r), v: (d_in, r)): per token (delta_t us) . (a_t v), so
    T r (d_in + d_out) multiply-adds per sequence instead of T d_in d_out."""
    a, delta = a.float(), delta.float()
    total = per_sequence_dot(delta @ us, a @ v)
    return total + _bias_term(delta, bias_grad) if bias_grad is not None else total


def embedding_dots(ids: torch.Tensor, delta: torch.Tensor, weight_grad: torch.Tensor,
                   padding_idx: int | None = None) -> torch.Tensor:
    """Per-sequence sum_t delta_t . G_E[id_t]: a gather of g's rows, no matmul."""
    rows = F.embedding(ids, weight_grad)
    if padding_idx is not None:  # nn.Embedding gives the padding row no gradient
        rows = rows.masked_fill((ids == padding_idx).unsqueeze(-1), 0.0)
    return per_sequence_dot(rows, delta.float())


def layer_norm_dots(x: torch.Tensor, delta: torch.Tensor, normalized_shape: tuple[int, ...], eps: float,
                    weight_grad: torch.Tensor | None, bias_grad: torch.Tensor | None) -> torch.Tensor:
    """Per-sequence sum_t (delta_t * x^_t) . G_gamma + delta_t . G_beta. x^ G_gamma + G_beta is itself a layer
    norm of x with (G_gamma, G_beta) as its affine parameters: one fused op, from the input the hook kept."""
    if weight_grad is None and bias_grad is None:
        return delta.new_zeros(delta.shape[0], dtype=torch.float32)
    return per_sequence_dot(F.layer_norm(x.float(), normalized_shape, weight_grad, bias_grad, eps), delta.float())


def rms_norm_dots(x: torch.Tensor, delta: torch.Tensor, normalized_shape: tuple[int, ...], eps: float,
                  weight_grad: torch.Tensor | None) -> torch.Tensor:
    """Per-sequence sum_t (delta_t * x^_t) . G_w for y = w * x^, x^ = x / sqrt(mean(x^2) + eps) over
    `normalized_shape`: x^ G_w is itself an RMS norm of x with G_w as its weight (one fused op from the input the
    hook kept). x^ is recomputed in fp32 (transformers' Llama norm rounds it to the input dtype before scaling: an
    fp32 model loses nothing, a bf16 one differs by that rounding, far below the spread between sequences)."""
    if weight_grad is None:
        return delta.new_zeros(delta.shape[0], dtype=torch.float32)
    return per_sequence_dot(F.rms_norm(x.float(), normalized_shape, weight_grad, eps), delta.float())


def low_rank_factors(matrix: torch.Tensor, rank: int, seed: int = 0, oversample: int = 8,
                     power_iterations: int = 2) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(us, v, captured) with matrix ~ us v^T of rank min(rank, min(matrix.shape)); `captured` is the share of
    ||matrix||_F^2 the factors hold. At full rank an exact SVD; below it a randomized SVD (Halko et al. 2011: range
    finder with `oversample` extra columns and `power_iterations` QR-stabilised power steps) drawn from its own
    seeded generator, so refreshing the factors never moves the caller's random stream (torch.svd_lowrank draws
    from the global one)."""
    if rank < 1:
        raise ValueError(f"rank = {rank}: expected a positive rank for the low-rank factors")
    matrix = matrix.float()
    d_out, d_in = matrix.shape
    rank = min(rank, d_out, d_in)
    total = float(matrix.square().sum())
    if rank + oversample >= min(d_out, d_in):
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    else:
        generator = torch.Generator(device=matrix.device).manual_seed(seed)
        omega = torch.randn(d_in, rank + oversample, generator=generator, device=matrix.device)
        q = torch.linalg.qr(matrix @ omega).Q
        for _ in range(power_iterations):  # sharpen the spectrum's decay; QR keeps the basis well conditioned
            q = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ q).Q).Q
        u_small, s, vh = torch.linalg.svd(q.T @ matrix, full_matrices=False)
        u = q @ u_small
    s = s[:rank]
    captured = float(s.square().sum()) / total if total > 0 else 1.0
    # Both factors are views of contiguous (rank, d) tensors, the layout of an nn.Linear weight: delta @ us then
    # reads like a Linear forward (on CPU 3x faster than a row-major (d_out, rank) us for the output head).
    return (u[:, :rank] * s).T.contiguous().T, vh[:rank].contiguous().T, captured
