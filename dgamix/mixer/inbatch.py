"""In-batch alignment: d_x = <grad_theta l(theta; x), g> for every sequence x the training step backpropagates.

g is the specialized (target) gradient, set or refreshed by the caller every T_r steps. The scores come from what
the training backward already computes, without a backward per sequence: for each supported module (nn.Linear,
nn.Embedding, nn.LayerNorm, nn.RMSNorm, and from transformers GPT-2's Conv1D and Llama's RMSNorm with its verbatim
copies), a forward hook keeps the module's input and registers a tensor hook on its output; in the backward, that
hook receives delta (the gradient with respect to the output) and reduces (input, delta) to one number per
sequence with the layer's block of g (`inbatch_math`). Hooks only read: the training gradients are bit-identical
to a run without the tracker. A weight used by several modules (tied embedding and head) gets one term per use.

Hugging Face causal LMs: GPT2LMHeadModel, LlamaForCausalLM and GPTNeoXForCausalLM are covered in full and validated
against torch.func per-sequence gradients of transformers' own loss (tests/test_inbatch_hf.py). Their loss
(`model(input_ids=x, labels=x).loss`) is the mean over the batch's B * (T - 1) predicted tokens, so loss_scale is
1 / B for sequences of one length without ignored labels; with padding labelled -100 or a `num_items_in_batch`,
each sequence's weight is its number of counted tokens over the batch's (a (B,) loss_scale). GPT-2 looks its
position embedding up with ids of shape (1, T) broadcast over the batch: the tracker expands that output to B rows
(`expand_shared`, a view: training unchanged), so nobody has to pass batch-shaped position_ids.

Usage, with gradient accumulation over A micro-batches of B sequences each:

    tracker = InBatchAlignment(model)                        # coverage="exact": every trainable parameter reached
    tracker.refresh_target(model.loss, target_batches)       # every T_r steps; autograd.grad, .grad untouched
    for micro in micro_batches:
        loss = model.loss(micro) / A                         # mean over B sequences, then / A
        scaler.scale(loss).backward()                        # or loss.backward()
        tracker.collect(loss_scale=1 / (B * A), grad_scaler=scaler)   # before the next micro-batch's forward
    scores = tracker.take()                                  # one float64 (B,) tensor per micro-batch, in order

`loss_scale` is the weight each sequence's loss l(theta; x) had in the loss that was backpropagated (1 / (B * A)
above; `mean_loss_scale(B, A)`): the backward's delta carries it, and d_x is divided by it (and by the GradScaler's
scale), so d_x is the inner product for the per-sequence loss itself, e.g. its mean-over-tokens cross-entropy as
`GPT.sequence_losses` returns; a (B,) tensor gives sequences different weights. Under DistributedDataParallel, B
is the rank's own micro-batch (deltas are local; only parameter gradients are averaged) and g is reduced across
ranks by `target_gradient` (the mean of the ranks' own target batches, or, for one target batch split across the
ranks, the share-weighted sum of their slices' gradients). The dot products run in fp32 whatever the autocast
dtype (on CUDA, TF32 if the caller enables TF32 matmuls).

Requirements and limits:
- The sequence is dim 0 of every tracked module's output, and each sequence's loss depends on that sequence only
  (no BatchNorm-like coupling). An output shared by the batch (a position embedding computed once as (T, D) and
  broadcast) only shows the gradient summed over sequences; `collect` refuses outputs whose dim 0 disagrees and
  names the batch-shaped ids to pass. The one exception handled for you: an nn.Embedding looked up with one row of
  ids, after a tracked output of B rows in the same forward (GPT-2's wpe after wte), is expanded to B rows.
- One backward per forward (no retain_graph re-backward) and no activation checkpointing (its recomputation runs
  forward hooks inside the backward). Other differentiated forwards between a backward and `collect` (an exact
  DGA estimator, an evaluation with grad enabled) must run inside `tracker.paused()`.
- A parameter used outside the supported modules (F.linear on a module's own weight, a bare nn.Parameter added to
  activations) is reported by `coverage()` (coverage="partial"; below 90% of ||g||^2 covered, a warning names
  the share and the parameters left out); a use of a covered parameter outside its module is not detectable from
  the modules, but `gradient_dot()` checks the sum: right after one backward from zeroed gradients,
  loss_scale * sum_x d_x equals <p.grad, g> over the covered parameters.
- A forward after a backward whose scores were not collected raises, rather than mixing two batches' terms.
- FSDP-sharded parameters (fully_shard) are refused. Untested: torch.compile, CUDA (the code is device-agnostic; no GPU
  was available to test it).
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Literal, Mapping, Sequence

import torch
import torch.nn as nn

from .dga import mean_gradient, sharded_parameters
from .distributed import all_reduce_mean_, all_reduce_sum_, is_distributed
from .inbatch_math import (embedding_dots, layer_norm_dots, linear_dots, low_rank_factors, low_rank_linear_dots,
                           rms_norm_dots)

# Low rank applies by default to Linear weights of at least this many entries: on the reference GPT the output
# head (8192 x 128), whose exact term costs as much as all the other layers' together.
LOW_RANK_MIN_PARAMS = 2 ** 18
# coverage="partial": below this share of ||g||^2 in the covered parameters, set_target warns.
MIN_TARGET_SHARE = 0.9


def mean_loss_scale(batch_size: int, accumulation: int = 1) -> float:
    """The loss_scale of a mean over `batch_size` sequences divided by `accumulation` micro-batches."""
    if batch_size < 1 or accumulation < 1:
        raise ValueError(f"batch_size = {batch_size}, accumulation = {accumulation}: expected both >= 1")
    return 1.0 / (batch_size * accumulation)


def _check_loss_scale(loss_scale: float | torch.Tensor) -> None:
    expected = ("expected the positive weight of each sequence's loss in the backpropagated loss, e.g. "
                "1 / (batch_size * accumulation_steps), or a 1-d tensor of one such weight per sequence")
    if isinstance(loss_scale, torch.Tensor):
        if loss_scale.dim() != 1 or not bool(torch.isfinite(loss_scale).all() and (loss_scale > 0).all()):
            raise ValueError(f"loss_scale tensor of shape {tuple(loss_scale.shape)} with non-positive or non-finite "
                             f"entries: {expected}")
    elif isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)) or not (
            loss_scale > 0 and math.isfinite(loss_scale)):
        raise ValueError(f"loss_scale = {loss_scale!r}: {expected}")


# ---- the target gradient ---------------------------------------------------------------------------------------
def target_gradient(loss_fn: Callable[[object], torch.Tensor], params: Sequence[torch.nn.Parameter],
                    target_batches: Iterable[object], share: float | None = None) -> torch.Tensor:
    """g: the gradient of the mean of loss_fn over the target micro-batches, flat fp32 in `params` order, by
    torch.autograd.grad (the parameters' .grad is untouched). Under torch.distributed:
    - share None: each rank passed whole batches of its own; g is the mean of the ranks' gradients;
    - share a float: each rank passed its slice of batches split across ranks, `share` being its fraction of their
      sequences; g is the share-weighted sum of the ranks' gradients, that of one process over the whole batches.
    Reduced on the gradient's own device (NCCL has no CPU path); without a process group g is returned as computed.
    """
    local = mean_gradient(loss_fn, target_batches, params)
    if share is None:
        return all_reduce_mean_(local)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < share <= 1.0:
        raise ValueError(f"share = {share!r}: expected this rank's fraction of the target sequences, 0 < share <= 1")
    if not is_distributed():  # one process holds the whole batch: nothing to weigh (keeps g bit for bit)
        return local
    return all_reduce_sum_(local.mul_(share))


# ---- which parameters the hooks reach --------------------------------------------------------------------------
@dataclass(frozen=True)
class Coverage:
    """Which trainable parameters the hooks reach (by name, as model.named_parameters() gives them)."""

    covered: tuple[str, ...]
    uncovered: tuple[str, ...]  # their block of g is left out of every d_x
    target_share: float | None  # share of ||g||^2 in the covered parameters; None before a target is set

    @property
    def exact(self) -> bool:
        return not self.uncovered


# The names of the supported modules, for messages.
SUPPORTED_MODULES = ("nn.Linear", "nn.Embedding", "nn.LayerNorm", "nn.RMSNorm", "transformers' Conv1D (GPT-2)",
                     "transformers' Llama RMSNorm and its copies (Mistral, Qwen2, ...)")


def _is_transformers_class(module: nn.Module, module_name: str, qualname: str) -> bool:
    """Whether module is exactly transformers' class (no subclass), checked by name: transformers is never imported
    here, a model holding one has imported it already."""
    cls = type(module)
    return cls.__module__ == module_name and cls.__qualname__ == qualname


def _is_llama_rms_norm(module: nn.Module) -> bool:
    """transformers' LlamaRMSNorm, y = w * x / sqrt(mean(x^2) + variance_epsilon), or one of the many classes that
    copy it line for line (Mistral, Qwen2, Phi3, ...): their forward's bytecode, names and constants are Llama's.
    Gemma's (1 + w) and Olmo2's (w applied before the cast back) differ and stay unsupported."""
    cls = type(module)
    if not (cls.__module__.startswith("transformers.") and cls.__name__.endswith("RMSNorm")):
        return False
    if not isinstance(getattr(module, "variance_epsilon", None), float) or \
            dict(module.named_parameters(recurse=False)).keys() != {"weight"}:
        return False
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except ImportError:  # a transformers without Llama: nothing to compare with
        return False
    ours, ref = getattr(cls.forward, "__code__", None), LlamaRMSNorm.forward.__code__
    return ours is not None and (ours.co_code, ours.co_names, ours.co_consts, ours.co_varnames) == (
        ref.co_code, ref.co_names, ref.co_consts, ref.co_varnames)


def _supported_kind(module: nn.Module) -> str | None:
    """The math a module's parameters follow, or None. A subclass that overrides forward (a LoRA Linear, a
    quantized one) is not assumed to compute what its base class does."""
    for kind, base in (("linear", nn.Linear), ("embedding", nn.Embedding), ("layer_norm", nn.LayerNorm),
                       ("rms_norm", nn.RMSNorm)):
        if isinstance(module, base) and type(module).forward is base.forward:
            if kind == "embedding" and module.scale_grad_by_freq:  # its gradient depends on the whole batch
                return None
            return kind
    if _is_transformers_class(module, "transformers.pytorch_utils", "Conv1D"):
        return "conv1d"  # y = x @ W + b (addmm), W of shape (in, out): Linear's math with W transposed
    if _is_llama_rms_norm(module):
        return "rms_norm"
    return None


def _rms_eps(module: nn.Module, saved: torch.Tensor) -> float:
    """The eps a supported RMS norm adds to mean(x^2): Llama's variance_epsilon; nn.RMSNorm's eps, whose None means
    the machine epsilon of the input's dtype."""
    if hasattr(module, "variance_epsilon"):
        return float(module.variance_epsilon)
    return float(module.eps) if module.eps is not None else float(torch.finfo(saved.dtype).eps)


@dataclass
class _Tap:
    """One hooked module and the ids of its trainable parameters (None where frozen or absent)."""

    name: str
    module: nn.Module
    kind: str
    weight: int | None
    bias: int | None


class _Pending:
    """What one forward call of a tracked module left for its backward: the saved input until delta arrives."""

    __slots__ = ("tap", "saved", "handle", "rows")

    def __init__(self, tap: _Tap, saved: torch.Tensor, rows: int):
        self.tap, self.saved, self.handle, self.rows = tap, saved, None, rows  # rows: dim 0 of the output


class InBatchAlignment:
    """Per-sequence alignment d_x = <grad l(theta; x), g> from the training backward (see the module docstring).

    coverage: "exact" refuses a model with a trainable parameter no hook reaches (the error names them);
        "partial" scores with the covered parameters only (`coverage().target_share` says how much of g they hold).
        Below `MIN_TARGET_SHARE` of ||g||^2 covered, `set_target` warns (once per tracker) with the share and
        the parameters left out.
    rank: None (default) computes every term exactly; an int replaces the block G_W of each Linear (or Conv1D)
        weight with at least `low_rank_min_params` entries by a rank-`rank` factorization, refreshed with the target.
    seed: of the randomized SVD's own generator (the global random stream is never drawn from).
    expand_shared: an nn.Embedding looked up with one row of ids (position ids of shape (1, T), as transformers'
        GPT-2 builds them) in a forward whose earlier tracked outputs have B > 1 rows returns its output expanded
        to B rows: a view with the same values, whose backward sums over the batch exactly as the broadcast it
        replaces did, so training is unchanged and each sequence gets its own gradient of the lookup. False keeps
        the output as it is (then `collect` refuses the batch and names the ids to pass).
    """

    def __init__(self, model: nn.Module, *, coverage: Literal["exact", "partial"] = "exact",
                 rank: int | None = None, low_rank_min_params: int = LOW_RANK_MIN_PARAMS, seed: int = 0,
                 expand_shared: bool = True):
        if coverage not in ("exact", "partial"):
            raise ValueError(f"coverage = {coverage!r}: expected 'exact' or 'partial'")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"rank = {rank!r}: expected None (exact) or a positive int")
        self.model, self.rank, self.low_rank_min_params, self.seed = model, rank, low_rank_min_params, seed
        self.expand_shared = bool(expand_shared)
        # Trainable parameters in model.parameters() order, a tied parameter once: the layout of a flat g.
        self.params: list[tuple[str, nn.Parameter]] = [(n, p) for n, p in model.named_parameters()
                                                       if p.requires_grad]
        if sharded_parameters([p for _, p in self.params]):
            raise ValueError("in-batch alignment does not support FSDP-sharded (DTensor) parameters (fully_shard): "
                             "each sequence's score needs every layer's whole block of g, which FSDP keeps "
                             "sharded; expected unsharded parameters (DDP or one process), or use DGAStrategy "
                             "with estimator='exact', which supports fully_shard")
        trainable = {id(p) for _, p in self.params}
        self._taps: list[_Tap] = []
        # nn.MultiheadAttention applies F.linear to out_proj's weight without calling out_proj: hooks on modules
        # inside it would never fire, so its parameters are all uncovered.
        opaque = [name + "." for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)]
        for name, module in model.named_modules():
            kind = _supported_kind(module)
            if kind is None or any(name.startswith(prefix) for prefix in opaque):
                continue
            weight, bias = (getattr(module, attr, None) for attr in ("weight", "bias"))
            ids = [id(p) if isinstance(p, nn.Parameter) and id(p) in trainable else None for p in (weight, bias)]
            if ids != [None, None]:
                self._taps.append(_Tap(name, module, kind, *ids))
        reached = {i for tap in self._taps for i in (tap.weight, tap.bias) if i is not None}
        self._covered = tuple(n for n, p in self.params if id(p) in reached)
        self._uncovered = tuple(n for n, p in self.params if id(p) not in reached)
        if coverage == "exact" and self._uncovered:
            raise ValueError(
                f"{len(self._uncovered)} trainable parameters are used outside the supported modules "
                f"({', '.join(SUPPORTED_MODULES)}), so no hook sees their per-sequence gradients: "
                f"{list(self._uncovered[:8])}{' ...' if len(self._uncovered) > 8 else ''}. Express them as those "
                "modules (e.g. nanoGPT's c_attn / c_proj instead of nn.MultiheadAttention), freeze them, or pass "
                "coverage='partial' to score with the covered parameters only")
        self.enabled = True
        self._blocks: dict[int, torch.Tensor] | None = None  # id(param) -> its fp32 block of g
        self._noise_blocks: dict[int, torch.Tensor] | None = None  # the same for the noise direction, if any
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # tap name -> (us, v)
        self._noise_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.low_rank_layers: dict[str, dict[str, float]] = {}  # tap name -> {"rank", "captured"}
        self._target_share: float | None = None
        self._warned_share = False
        self._pending: list[_Pending] = []
        self._terms: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []  # (tap, term along g, along h)
        self._refired = False
        self._results: list[torch.Tensor] = []
        self.last_noise_scores: torch.Tensor | None = None  # the last collect's <grad l(x), h>, when h is set
        self.last_layer_terms: dict[str, torch.Tensor] = {}  # the last collect's d_x split by module (diagnostics)
        self._handles = [tap.module.register_forward_hook(functools.partial(self._forward_hook, tap), with_kwargs=True)
                         for tap in self._taps]

    # ---- target ---------------------------------------------------------------------------------------------
    def set_target(self, target: torch.Tensor | Mapping[str, torch.Tensor],
                   noise: torch.Tensor | Mapping[str, torch.Tensor] | None = None) -> None:
        """Set g: a flat tensor in `self.params` order (as `target_gradient` returns) or {parameter name: tensor}
        over every trainable parameter. Held in fp32; the low-rank factors, if any, are refreshed from it.

        `noise`: a second direction h of the same shape (e.g. the split-half difference of g's two halves, whose
        spread is that of g's own sampling noise); every collect then also computes <grad l(theta; x), h> per
        sequence (`last_noise_scores`), at the cost of a second dot product per layer. None: g only."""
        self._blocks = self._as_blocks(target, "target")
        self._noise_blocks = None if noise is None else self._as_blocks(noise, "noise")
        squares = {i: float(torch.linalg.vector_norm(b, dtype=torch.float64)) ** 2 for i, b in self._blocks.items()}
        self._check_share(squares)
        self._refresh_factors()

    def _as_blocks(self, target: torch.Tensor | Mapping[str, torch.Tensor], what: str) -> dict[int, torch.Tensor]:
        """id(param) -> its fp32 block of a flat or by-name vector over the trainable parameters."""
        if isinstance(target, torch.Tensor):
            expected = sum(p.numel() for _, p in self.params)
            if target.dim() != 1 or target.numel() != expected:
                raise ValueError(f"{what} of shape {tuple(target.shape)}: expected a flat tensor of {expected} "
                                 "entries, the trainable parameters in model.named_parameters() order")
            pieces = torch.split(target, [p.numel() for _, p in self.params])
            blocks = {id(p): piece.view(p.shape) for (_, p), piece in zip(self.params, pieces)}
        else:
            missing = [n for n, _ in self.params if n not in target]
            if missing:
                raise ValueError(f"{what} lacks trainable parameters {missing[:8]}: expected one tensor per name "
                                 "of model.named_parameters() that requires grad")
            blocks = {}
            for name, p in self.params:
                if tuple(target[name].shape) != tuple(p.shape):
                    raise ValueError(f"{what}['{name}'] has shape {tuple(target[name].shape)}, expected "
                                     f"{tuple(p.shape)}")
                blocks[id(p)] = target[name]
        # Held by reference where already fp32 on the parameter's device (no second copy of g): do not modify g in
        # place afterwards.
        return {id(p): blocks[id(p)].detach().to(device=p.device, dtype=torch.float32) for _, p in self.params}

    def _check_share(self, squares: dict[int, float]) -> None:
        covered = {id(p) for n, p in self.params if n in self._covered}
        total = sum(squares.values())
        self._target_share = sum(squares[i] for i in covered) / total if total > 0 else 1.0
        if self._uncovered and self._target_share < MIN_TARGET_SHARE and not self._warned_share:
            # Scores that leave out most of g rank sequences by a different direction than g: say so, once (the
            # share at later refreshes is in coverage().target_share).
            self._warned_share = True
            left_out = sorted(((squares[id(p)] / total, n) for n, p in self.params if n in set(self._uncovered)),
                              reverse=True)
            shown = ", ".join(f"{n} ({share:.1%})" for share, n in left_out[:8])
            warnings.warn(
                f"in-batch alignment with coverage='partial': the covered parameters hold only "
                f"{self._target_share:.1%} of ||g||^2 (below {MIN_TARGET_SHARE:.0%}), so every score leaves out the "
                f"rest of the target gradient; not covered ({len(left_out)}, share of ||g||^2): {shown}"
                f"{' ...' if len(left_out) > 8 else ''}. Express them as supported modules "
                f"({', '.join(SUPPORTED_MODULES)}) or freeze them", UserWarning, stacklevel=3)

    def _refresh_factors(self) -> None:
        self._factors, self._noise_factors, self.low_rank_layers = {}, {}, {}
        if self.rank is None:
            return
        for tap in self._taps:
            if tap.kind in ("linear", "conv1d") and tap.weight is not None and \
                    self._blocks[tap.weight].numel() >= self.low_rank_min_params:
                for blocks, factors in ((self._blocks, self._factors), (self._noise_blocks, self._noise_factors)):
                    if blocks is None:
                        continue
                    block = blocks[tap.weight]
                    us, v, captured = low_rank_factors(block if tap.kind == "linear" else block.T, self.rank,
                                                       seed=self.seed)
                    factors[tap.name] = (us, v)
                    if blocks is self._blocks:
                        self.low_rank_layers[tap.name] = {"rank": us.shape[1], "captured": captured}

    def refresh_target(self, loss_fn: Callable[[object], torch.Tensor], target_batches: Iterable[object],
                       share: float | None = None) -> torch.Tensor:
        """g from the target micro-batches (`target_gradient`, with the tracker paused so that its own backward is
        not scored), then `set_target`. Returns the flat g. `share`: as for `target_gradient` (this rank's fraction
        of batches split across ranks). The low-rank factors are taken from the reduced g, so every rank holds the
        factors of the whole batch's gradient."""
        with self.paused():
            target = target_gradient(loss_fn, [p for _, p in self.params], target_batches, share)
        self.set_target(target)
        return target

    def coverage(self) -> Coverage:
        return Coverage(self._covered, self._uncovered, self._target_share)

    # ---- hooks ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forwards inside are not scored (their backward leaves the tracker alone)."""
        enabled, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = enabled

    def _forward_hook(self, tap: _Tap, module: nn.Module, args: tuple, kwargs: dict,
                      output: object) -> torch.Tensor | None:
        if not (self.enabled and self._blocks is not None and torch.is_grad_enabled()):
            return None
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None
        if self._terms:  # a backward has delivered terms that nobody collected: they would mix with this batch's
            raise RuntimeError("in-batch alignment: a forward started after a backward whose per-sequence scores "
                               "were not collected; call tracker.collect(loss_scale=...) after each backward, or "
                               "run other differentiated forwards inside tracker.paused()")
        # The input is kept by reference, not copied: autograd saves the same tensor for the weight gradient.
        # Every supported module takes one tensor (named input, x or hidden_states).
        saved = (args[0] if args else next(iter(kwargs.values()))).detach()
        replaced = None
        one_row = tap.kind == "embedding" and saved.dim() >= 2 and saved.shape[0] == 1
        if one_row and output.shape[0] > 1 and tuple(output.shape[1:-1]) == tuple(saved.shape[1:]):
            # A hook before this one (a second tracker on the model) already expanded the lookup: the ids follow.
            saved = saved.expand(output.shape[0], *saved.shape[1:])
        elif one_row and self.expand_shared and output.shape[0] == 1 and (rows := self._batch_rows() or 1) > 1:
            # One row of ids (positions (1, T)) broadcast over B sequences: the broadcast's backward would sum the
            # sequences' gradients before any hook sees them. expand is the same broadcast made explicit (a view;
            # its backward is the same sum_to), so the hook below sees one delta per sequence.
            output = replaced = output.expand(rows, *output.shape[1:])
            saved = saved.expand(rows, *saved.shape[1:])
        pending = _Pending(tap, saved, output.shape[0])
        pending.handle = output.register_hook(functools.partial(self._backward_hook, pending))
        self._pending.append(pending)
        return replaced

    def _batch_rows(self) -> int | None:
        """B, the dim 0 that every output tracked so far in this forward has; None before any or if they differ."""
        rows = {pending.rows for pending in self._pending}
        return rows.pop() if len(rows) == 1 else None

    def _backward_hook(self, pending: _Pending, delta: torch.Tensor) -> None:
        saved, pending.saved = pending.saved, None  # drop the activation as soon as it is used
        if saved is None:
            self._refired = True
            return None
        # The backward may run inside the caller's autocast region: the dot products stay in fp32.
        with torch.no_grad(), torch.autocast(delta.device.type, enabled=False):
            tap = pending.tap
            noise = (self._term(tap, saved, delta, self._noise_blocks, self._noise_factors)
                     if self._noise_blocks is not None else None)
            self._terms.append((tap.name, self._term(tap, saved, delta, self._blocks, self._factors), noise))
        return None  # never changes the gradient

    def _term(self, tap: _Tap, saved: torch.Tensor, delta: torch.Tensor, blocks: dict[int, torch.Tensor],
              factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        module = tap.module
        weight = blocks[tap.weight] if tap.weight is not None else None
        bias = blocks[tap.bias] if tap.bias is not None else None
        if tap.kind in ("linear", "conv1d"):
            if tap.name in factors:
                return low_rank_linear_dots(saved, delta, *factors[tap.name], bias)
            # Conv1D keeps W as (in, out): its G_W transposed (a view) is the (out, in) block of a Linear.
            return linear_dots(saved, delta, weight if tap.kind == "linear" or weight is None else weight.T, bias)
        if tap.kind == "embedding":
            return embedding_dots(saved, delta, weight, module.padding_idx)
        if tap.kind == "rms_norm":
            shape = tuple(weight.shape) if weight is not None else tuple(module.normalized_shape)
            return rms_norm_dots(saved, delta, shape, _rms_eps(module, saved), weight)
        return layer_norm_dots(saved, delta, tuple(module.normalized_shape), module.eps, weight, bias)

    # ---- results --------------------------------------------------------------------------------------------
    def collect(self, *, loss_scale: float | torch.Tensor, grad_scaler: object | None = None,
                n_sequences: int | None = None) -> torch.Tensor:
        """The scores of the micro-batch just backpropagated: float64, shape (n_sequences,), in batch order, on the
        model's device; also kept for `take()`. Call after each backward, before the next forward.

        loss_scale: the weight of each sequence's loss in the backpropagated loss: 1 / (B * A) for a mean over B
            sequences divided by A accumulation steps, or one weight per sequence, shape (B,), where they differ
            (a token mean over sequences of different lengths n_x: n_x / sum(n) for each l(x) = its token mean).
        grad_scaler: the torch.amp.GradScaler whose scale the backward carried, if any (read before its update()).
        n_sequences: B, checked against the outputs' dim 0."""
        _check_loss_scale(loss_scale)
        terms, refired = self._terms, self._refired
        sizes = {name: term.shape[0] for name, term, _ in terms}  # for the message
        counts = {term.shape[0] for _, term, _ in terms}  # every call's, a module called twice included
        if terms and not refired and len(counts) == 1 and isinstance(loss_scale, torch.Tensor) \
                and loss_scale.numel() != terms[0][1].shape[0]:  # a caller's mistake: the terms stay for a retry
            raise ValueError(f"loss_scale has {loss_scale.numel()} weights for a micro-batch of "
                             f"{terms[0][1].shape[0]} sequences")
        self._release()  # from here on the terms are either used or unusable
        if refired:
            raise RuntimeError("in-batch alignment: a tracked output received a second gradient (a backward through "
                               "the same graph twice, e.g. retain_graph=True); its per-sequence terms are unusable")
        if not terms:
            raise RuntimeError("in-batch alignment: nothing to collect; expected a forward and backward since the "
                               "last collect with the tracker enabled and a target set (set_target / "
                               "refresh_target)")
        if len(counts) > 1 or (n_sequences is not None and counts != {n_sequences}):
            raise ValueError(f"in-batch alignment: the tracked outputs disagree on the number of sequences (dim 0): "
                             f"{sizes}{f', expected {n_sequences}' if n_sequences is not None else ''}. Each "
                             "module's output must have one row per sequence; an output shared by the batch (e.g. "
                             "a position embedding of shape (T, D) broadcast over it) hides per-sequence gradients: "
                             "give it batch-shaped input, position ids of shape (B, T) (for a transformers model, "
                             "model(input_ids, position_ids=torch.arange(T).expand(B, T)); one row of ids (1, T) "
                             "is expanded for you when expand_shared=True and the lookup follows a batch-shaped "
                             "tracked output in the forward, as GPT-2's wpe follows wte)")
        device = terms[0][1].device
        grad_scale = float(grad_scaler.get_scale()) if grad_scaler is not None else 1.0
        scale = (loss_scale.to(device=device, dtype=torch.float64) if isinstance(loss_scale, torch.Tensor)
                 else float(loss_scale)) * grad_scale
        by_layer: dict[str, torch.Tensor] = {}
        for name, term, _ in terms:  # summed in float64: layers' terms of opposite signs cancel
            by_layer[name] = by_layer[name] + term.double() if name in by_layer else term.double()
        self.last_layer_terms = {name: term / scale for name, term in by_layer.items()}
        scores = torch.stack(list(self.last_layer_terms.values())).sum(dim=0)
        noise = [term.double() for _, _, term in terms if term is not None]
        self.last_noise_scores = torch.stack(noise).sum(dim=0) / scale if len(noise) == len(terms) else None
        self._results.append(scores)
        return scores

    def take(self) -> list[torch.Tensor]:
        """The collected micro-batches' scores since the last take, in order, as float64 CPU tensors; clears them."""
        results, self._results = self._results, []
        return [r.cpu() for r in results]

    def reset(self) -> None:
        """Forget uncollected terms, saved activations and collected scores (e.g. after a skipped step)."""
        self._release()
        self._results = []

    def _release(self) -> None:
        for pending in self._pending:  # an output that got no gradient still holds its input: free it
            pending.saved = None
            pending.handle.remove()
        self._pending, self._terms, self._refired = [], [], False

    def gradient_dot(self) -> float:
        """<p.grad, g> over the covered parameters (float64): after one backward from zeroed gradients it equals
        loss_scale * (sum of that micro-batch's scores), which checks that no use of a covered parameter escaped
        the hooks (a weight also used by F.linear outside its module would break the equality)."""
        if self._blocks is None:
            raise RuntimeError("no target set: call set_target or refresh_target first")
        names = set(self._covered)
        return float(sum(torch.dot(p.grad.double().reshape(-1), self._blocks[id(p)].double().reshape(-1))
                         for n, p in self.params if n in names and p.grad is not None))

    def close(self) -> None:
        """Remove every hook; the tracker is unusable afterwards."""
        self._release()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> InBatchAlignment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
