"""Reference training run: the small GPT on the mixer stream under one strategy, with evaluation and resume.

`dgamix train --strategy NAME` (what dvc.yaml's foreach calls) reads the `train` section of params.yaml.
Strategies: uniform (over the bases), natural, importance (static weight 1 on the importance basis), dga (no EMA),
dga_ema, inbatch (DGA over the bases scored from the training step's own sequences), inbatch_domains (the same over
every fine cluster: domain reweighting), doge (the DoGE baseline: learning-rate-scaled alignment normalized by the
mean gradient norm, clipped, no EMA), and odm (the EXP3 bandit of Online Data Mixing over disjoint domains: the
coarse bases when the bases stage built them, else one domain per cluster). Outputs in runs/NAME/:
- metrics.json: the final and best losses (what `dvc metrics show` tabulates), the bases and the final weights;
- summary.json: how the run went (steps, seconds, parameters, skipped updates, clusters repeated, eval sets);
- log.csv: per step: train loss, evaluation losses when measured, weights `w:`, alignment scores `a:`, tokens
  drawn per basis `t:` (a sequence's tokens split over the bases in proportion to alpha_j P_j(cluster)), skipped
  updates;
- clusters.parquet: (step, cluster, tokens): what was drawn;
- alignment.parquet (in-batch strategies): (step, cluster, sequences, mean_alignment): each update window's mean
  alignment of the sequences drawn from each cluster with the specialized gradient (> 0: they help the target);
- checkpoint.pt while the run is in progress (resumed when present, removed when the run completes).

Evaluation: the specialized loss on the target's held-out eval set (`train.target_eval`), and the generic loss on
the held-out generic documents (`<train.tokens>/heldout`, tokenize stage), which training never reads.
"""
from __future__ import annotations

import contextlib
import csv
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..core.atomic import atomic_path, write_json
from ..core.defaults import STRATEGIES
from ..core.params import ParamError, local_path, non_negative_int, positive_int, require, section
from ..formats import token_store
from ..mixer import DGA, ODM, ClusterStore, DoGE, InBatchDGA, Mixer, Mixture, StateMismatchError, Static, TargetSampler
from ..mixer.alignment_stats import SCALES
from ..mixer.dga import ESTIMATORS
from ..mixer.strategies import StrategySpec
from .model import GPT, GPTConfig

log = logging.getLogger(__name__)

Drawn = list[tuple[int, dict[int, int]]]  # per step: tokens drawn per cluster
METRIC_DECIMALS = 6  # `dvc metrics show` prints what the file holds: six decimals of a loss are plenty
PRECISIONS = ("fp32", "bf16", "auto")  # and null: as before (bf16 autocast on CUDA, fp32 on the CPU)
ADAMW_IMPLS = ("foreach", "fused")  # and null: torch's default (the per-parameter loop on the CPU)
# Strategies whose training forward carries the in-batch tracker's module and tensor hooks: torch.compile would
# trace them into the graph (or break it at every hook), which the tracker was never validated against.
NOT_COMPILED = ("inbatch", "inbatch_domains")
TARGET_HINT = "run the target stages first (`dvc repro`, or `dgamix tokenize --target {name}`)"


# ---- parameters (pure) -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """The `train` section, validated: every value comes from params.yaml or `dgamix.core.defaults`."""

    strategy: str
    steps: int
    seq_len: int
    batch_size: int
    lr: float
    n_layer: int
    n_head: int
    n_embd: int
    eval_every: int
    eval_batches: int
    checkpoint_every: int
    token_cap: int | None
    basis_names: list[str] | None
    eta: float
    beta: float
    every: int
    dga_batch_size: int
    dga_target_batch_size: int | None
    estimator: str
    inbatch_eta: float
    inbatch_every: int
    inbatch_score_every: int
    inbatch_refresh: int
    inbatch_decay: float | None
    inbatch_min_sequences: float
    inbatch_scale: str
    inbatch_rank: int | None
    weight_floor: float
    doge_mu: float
    doge_clip_min: float
    doge_clip_max: float
    doge_grad_clip: float
    seed: int
    eval_seed: int | None
    precision: str | None
    compile: bool
    threads: int | None
    adamw_impl: str | None
    tokens: Path
    bases: Path
    target: Path
    target_eval: Path
    output: Path

    @property
    def out_dir(self) -> Path:
        return self.output / self.strategy


def read_config(params: dict[str, Any], strategy: str) -> TrainConfig:
    """Validate the `train` section for one strategy; a missing key takes its default from `dgamix.core.defaults`."""
    cfg = section(params, "train")
    if strategy not in STRATEGIES:
        raise ParamError(f"train.strategy = '{strategy}': expected one of {STRATEGIES}")
    config = TrainConfig(
        strategy=strategy,
        steps=positive_int(cfg, "train", "steps"),
        seq_len=positive_int(cfg, "train", "seq_len"),
        batch_size=positive_int(cfg, "train", "batch_size"),
        lr=_positive_float(cfg, "lr"),
        n_layer=positive_int(cfg, "train", "n_layer"),
        n_head=positive_int(cfg, "train", "n_head"),
        n_embd=positive_int(cfg, "train", "n_embd"),
        eval_every=positive_int(cfg, "train", "eval_every"),
        eval_batches=positive_int(cfg, "train", "eval_batches"),
        checkpoint_every=positive_int(cfg, "train", "checkpoint_every"),
        token_cap=_optional_positive_int(cfg, "token_cap"),
        basis_names=_basis_names(cfg),
        eta=_positive_float(cfg, "eta"),
        beta=_fraction(cfg, "beta"),
        every=positive_int(cfg, "train", "every"),
        dga_batch_size=positive_int(cfg, "train", "dga_batch_size"),
        dga_target_batch_size=_optional_positive_int(cfg, "dga_target_batch_size"),
        estimator=require(cfg, "train", "estimator", str),
        inbatch_eta=_positive_float(cfg, "inbatch_eta"),
        inbatch_every=positive_int(cfg, "train", "inbatch_every"),
        inbatch_score_every=positive_int(cfg, "train", "inbatch_score_every"),
        inbatch_refresh=positive_int(cfg, "train", "inbatch_refresh"),
        inbatch_decay=_optional_fraction(cfg, "inbatch_decay"),
        inbatch_min_sequences=float(require(cfg, "train", "inbatch_min_sequences", (int, float))),
        inbatch_scale=require(cfg, "train", "inbatch_scale", str),
        inbatch_rank=_optional_positive_int(cfg, "inbatch_rank"),
        weight_floor=float(require(cfg, "train", "weight_floor", (int, float))),
        doge_mu=_positive_float(cfg, "doge_mu"),
        doge_clip_min=_finite_float(cfg, "doge_clip_min"),
        doge_clip_max=_finite_float(cfg, "doge_clip_max"),
        doge_grad_clip=_finite_float(cfg, "doge_grad_clip"),
        seed=non_negative_int(cfg, "train", "seed"),
        eval_seed=_optional_non_negative_int(cfg, "eval_seed"),
        precision=require(cfg, "train", "precision", str),
        compile=require(cfg, "train", "compile", bool),
        threads=_optional_positive_int(cfg, "threads"),
        adamw_impl=require(cfg, "train", "adamw_impl", str),
        tokens=local_path(cfg, "train", "tokens"),
        bases=local_path(cfg, "train", "bases"),
        target=local_path(cfg, "train", "target"),
        target_eval=local_path(cfg, "train", "target_eval"),
        output=local_path(cfg, "train", "output"),
    )
    if config.estimator not in ESTIMATORS:
        raise ParamError(f"train.estimator = '{config.estimator}': expected one of {sorted(ESTIMATORS)}")
    if config.precision is not None and config.precision not in PRECISIONS:
        raise ParamError(f"train.precision = '{config.precision}': expected null or one of {list(PRECISIONS)}")
    if config.adamw_impl is not None and config.adamw_impl not in ADAMW_IMPLS:
        raise ParamError(f"train.adamw_impl = '{config.adamw_impl}': expected null or one of {list(ADAMW_IMPLS)}")
    if config.inbatch_scale not in SCALES:
        raise ParamError(f"train.inbatch_scale = '{config.inbatch_scale}': expected one of {list(SCALES)}")
    if not 0 <= config.weight_floor < 1:
        raise ParamError(f"train.weight_floor = {config.weight_floor}: expected 0 <= floor < 1")
    if config.doge_clip_min > config.doge_clip_max:
        raise ParamError(f"train.doge_clip_min = {config.doge_clip_min} > train.doge_clip_max = "
                         f"{config.doge_clip_max}: expected min <= max")
    if config.doge_grad_clip < 0:
        raise ParamError(f"train.doge_grad_clip = {config.doge_grad_clip}: expected >= 0 (0: no clipping)")
    if config.n_embd % config.n_head:  # attention splits the embedding evenly over the heads
        raise ParamError(f"train.n_embd = {config.n_embd}: expected a multiple of train.n_head = {config.n_head}")
    return config


def _positive_float(cfg: dict[str, Any], key: str) -> float:
    value = float(require(cfg, "train", key, (int, float)))
    if not (value > 0 and math.isfinite(value)):
        raise ParamError(f"train.{key} = {value}: expected a positive number")
    return value


def _finite_float(cfg: dict[str, Any], key: str) -> float:
    value = float(require(cfg, "train", key, (int, float)))
    if not math.isfinite(value):
        raise ParamError(f"train.{key} = {value}: expected a finite number")
    return value


def _fraction(cfg: dict[str, Any], key: str) -> float:
    value = float(require(cfg, "train", key, (int, float)))
    if not 0 < value <= 1:
        raise ParamError(f"train.{key} = {value}: expected 0 < {key} <= 1")
    return value


def _optional_fraction(cfg: dict[str, Any], key: str) -> float | None:
    # null: the strategy derives the value (inbatch_decay: alignment_stats.auto_decay).
    return None if require(cfg, "train", key, (int, float)) is None else _fraction(cfg, key)


def _optional_positive_int(cfg: dict[str, Any], key: str) -> int | None:
    # null is a value of its own here ("no cap", "same as dga_batch_size"), and it is the default.
    return None if require(cfg, "train", key, int) is None else positive_int(cfg, "train", key)


def _optional_non_negative_int(cfg: dict[str, Any], key: str) -> int | None:
    return None if require(cfg, "train", key, int) is None else non_negative_int(cfg, "train", key)


def _basis_names(cfg: dict[str, Any]) -> list[str] | None:
    names = require(cfg, "train", "basis_names", list)
    if names is not None and not all(isinstance(n, str) for n in names):
        raise ParamError(f"train.basis_names = {names!r}: expected a list of basis names (see bases/names.json)")
    return names


# ---- run objects (reads the stores) ------------------------------------------------------------------------------
@dataclass
class RunObjects:
    """Everything a training step touches. Its checkpointed state is what a resumed run restores."""

    model: GPT
    optimizer: torch.optim.Optimizer
    mixer: Mixer
    device: str
    autocast: torch.dtype | None
    # The training step's forward: model.sequence_losses, or its torch.compile'd form (train.compile). Evaluation
    # and the strategies call the model itself, so compiling changes nothing they compute.
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None
    # The run's own settings that change what it computes beyond the strategy's (checked on resume: a resumed run
    # under other ones would mix two setups in one log, and torch's optimizer loading would overwrite adamw_impl).
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class History:
    """What the outputs are written from: one log row per step and the tokens drawn per cluster."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    drawn: Drawn = field(default_factory=list)
    alignment: list[dict[str, Any]] = field(default_factory=list)  # in-batch strategies: per-cluster records


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (x86 `flags`, ARM `Features`); empty where it does not."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_supports_bf16(flags: set[str] | None = None) -> bool:
    """bf16 arithmetic in hardware: x86 AVX512-BF16 or AMX-BF16, ARM BF16. Without it autocast still runs, but
    converts around fp32 kernels: slower than fp32, so `precision: auto` stays in fp32 there.
    (torch.backends.cpu.get_cpu_capability() says AVX512 whether or not the BF16 extension is there.)"""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def autocast_dtype(precision: str | None, device: str, bf16_supported: bool) -> torch.dtype | None:
    """Pure: the autocast dtype of a run (None: fp32, no autocast). null keeps what every recorded run did (bf16 on
    CUDA, fp32 on the CPU); `auto` takes bf16 wherever the hardware has it; `fp32` and `bf16` are what they say."""
    if precision is None:
        return torch.bfloat16 if device == "cuda" else None
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if bf16_supported else None  # auto


def resolve_device(precision: str | None = None) -> tuple[str, torch.dtype | None]:
    """The device and the autocast dtype (None: fp32) of a run with `train.precision` = precision."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # CUDA: bf16 arithmetic from compute capability 8 (Ampere) on; is_bf16_supported() also counts emulation.
    supported = torch.cuda.get_device_capability()[0] >= 8 if device == "cuda" else cpu_supports_bf16()
    if precision == "bf16" and not supported:
        log.warning("train.precision = bf16 on a %s without bf16 arithmetic: emulated, slower than fp32", device)
    return device, autocast_dtype(precision, device, supported)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads for the run (null: torch's default, OMP_NUM_THREADS or the machine's cores),
    restored afterwards: the setting is process-wide, and a caller training several runs must not inherit it."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_optimizer(model: torch.nn.Module, lr: float, impl: str | None) -> torch.optim.Optimizer:
    """AdamW without weight decay. impl null: torch's default (on the CPU a Python loop over the parameters);
    `foreach`: one multi-tensor kernel per operation; `fused`: one fused kernel (CPU and CUDA). Same update up to
    rounding; the choice is saved in the optimizer's state, so a resumed run keeps it."""
    kwargs = {"foreach": True} if impl == "foreach" else {"fused": True} if impl == "fused" else {}
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, **kwargs)


class CompiledForward:
    """torch.compile'd per-sequence losses that fall back to the eager function when the first call fails: compile
    errors (no C++ compiler for inductor, an unsupported Python) only show when the compiled function first runs.
    A genuine error in the model raises again from the eager call."""

    def __init__(self, eager: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.eager, self.checked, self.failed = eager, False, None
        try:  # some Pythons (free-threaded builds, versions newer than the torch) refuse at torch.compile itself
            self.compiled = torch.compile(eager)
        except Exception as err:  # noqa: BLE001
            self.compiled, self.checked = eager, True
            self.failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            log.warning("train.compile: torch.compile is unavailable here (%s); training eagerly", self.failed)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.checked:
            return self.compiled(tokens) if self.failed is None else self.eager(tokens)
        try:
            out = self.compiled(tokens)
        except Exception as err:  # noqa: BLE001  (any backend failure means: run eagerly)
            self.failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            log.warning("train.compile: torch.compile failed here (%s); training eagerly", self.failed)
            out = self.eager(tokens)
        self.checked = True
        return out


def training_forward(model: GPT, compile_: bool, strategy: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The training step's per-sequence losses: the model's own method, or (train.compile) its torch.compile'd form,
    which fuses the model and the cross-entropy into fewer kernels (compiled at the first step: tens of seconds on a
    CPU). Not for the in-batch strategies (NOT_COMPILED), nor where torch.compile cannot run: those train eagerly,
    with a warning."""
    if not compile_:
        return model.sequence_losses
    if strategy in NOT_COMPILED:
        log.warning("train.compile ignored for %s: its alignment hooks are not validated under torch.compile",
                    strategy)
        return model.sequence_losses
    return CompiledForward(model.sequence_losses)


def open_store(directory: Path, param: str, stage_hint: str, seed: int) -> ClusterStore:
    """A one-cluster token store named by a `train.*` path, with an error that says which stage writes it."""
    if not (directory / token_store.META).exists():
        raise ParamError(f"{param} = '{directory}' holds no token store ({token_store.META}): {stage_hint}")
    return ClusterStore(directory, seed=seed)


def build_run(config: TrainConfig) -> RunObjects:
    """Model, optimizer and mixer. The order of construction fixes every random draw (the torch seed is consumed by
    the model's initialization; in-batch DGA draws its first target batch when it attaches), so it must not change:
    runs reproduce earlier runs byte for byte."""
    torch.manual_seed(config.seed)
    device, autocast = resolve_device(config.precision)
    store = ClusterStore(config.tokens, token_cap=config.token_cap, seed=config.seed)
    mixture = Mixture.from_bases_dir(config.bases, config.basis_names)
    if config.strategy == "odm":
        mixture = domain_mixture(mixture, store)
    elif config.strategy == "inbatch_domains":  # domain reweighting over every fine cluster that has tokens
        mixture = Mixture.identity(store.available)
    target = TargetSampler(open_store(config.target, "train.target", TARGET_HINT.format(name="spec"), config.seed),
                           config.seq_len)
    try:
        mixer = Mixer(store, mixture, seq_len=config.seq_len, batch_size=config.batch_size, seed=config.seed,
                      strategy=strategy_settings(config), target=target, rank=0, world_size=1)
    except ValueError as err:  # what the parameters cannot tell in advance, e.g. a basis with no tokens
        raise ParamError(f"train: {err}") from err
    model = GPT(GPTConfig(vocab_size=store.vocab_size, block_size=config.seq_len, n_layer=config.n_layer,
                          n_head=config.n_head, n_embd=config.n_embd)).to(device)
    optimizer = make_optimizer(model, config.lr, config.adamw_impl)
    try:
        mixer.attach(model, loss_fn=model.loss, sequence_loss_fn=model.sequence_losses, optimizer=optimizer)
    except ValueError as err:
        raise ParamError(f"train: {err}") from err
    forward = training_forward(model, config.compile, config.strategy)
    settings = {"autocast": str(autocast), "compile": config.compile, "adamw_impl": config.adamw_impl,
                "eval_seed": config.eval_seed}
    return RunObjects(model, optimizer, mixer, device, autocast, forward, settings)


def domain_mixture(mixture: Mixture, store: ClusterStore) -> Mixture:
    """ODM needs disjoint domains: the coarse bases when present, else one domain per cluster."""
    coarse = [n for n in mixture.names if n.startswith("coarse:")]
    return mixture.select(coarse) if coarse else Mixture.identity(store.available)


def strategy_settings(config: TrainConfig) -> StrategySpec:
    """The mixer's strategy settings for `train.strategy` from the train section."""
    name = config.strategy
    if name == "odm":
        return ODM()
    if name == "uniform":
        return Static()
    if name in ("natural", "importance"):
        return Static(basis=name)
    if name in ("inbatch", "inbatch_domains"):
        return InBatchDGA(eta=config.inbatch_eta, every=config.inbatch_every, score_every=config.inbatch_score_every,
                          refresh=config.inbatch_refresh, target_batch_size=config.dga_batch_size,
                          decay=config.inbatch_decay, min_sequences=config.inbatch_min_sequences,
                          scale=config.inbatch_scale, floor=config.weight_floor,
                          level="clusters" if name == "inbatch_domains" else "bases", rank=config.inbatch_rank)
    if name == "doge":
        return DoGE(mu=config.doge_mu, clip_min=config.doge_clip_min, clip_max=config.doge_clip_max,
                    grad_clip=config.doge_grad_clip, every=config.every, batch_size=config.dga_batch_size,
                    target_batch_size=config.dga_target_batch_size)
    # dga or dga_ema (read_config admits no other name)
    return DGA(eta=config.eta, beta=1.0 if name == "dga" else config.beta, every=config.every,
               batch_size=config.dga_batch_size, target_batch_size=config.dga_target_batch_size,
               estimator=config.estimator)


@dataclass
class EvalSets:
    """Fixed evaluation batches, drawn once: the held-out specialized set and the held-out generic documents."""

    spec: list[torch.Tensor]
    generic: list[torch.Tensor]


def eval_seed(config: TrainConfig) -> int:
    """The seed of the evaluation draws. null: seed + 1, as in every recorded run (another offset would draw other
    evaluation batches, and losses would no longer compare with the recorded ones, bench/results). An int: the same
    batches for every seed and strategy, so the spread over seeds measures training, not which batches were drawn."""
    return config.seed + 1 if config.eval_seed is None else config.eval_seed


def load_eval_sets(config: TrainConfig) -> EvalSets:
    seed = eval_seed(config)
    spec = TargetSampler(open_store(config.target_eval, "train.target_eval", TARGET_HINT.format(name="eval"),
                                    seed), config.seq_len)
    spec_batches = [spec.sample(config.batch_size) for _ in range(config.eval_batches)]
    generic = TargetSampler(open_store(config.tokens / token_store.HELDOUT, "train.tokens (its heldout/ store)",
                                       "run the tokenize stage with tokenize.holdout_fraction > 0",
                                       seed), config.seq_len)
    generic_batches = [generic.sample(config.batch_size) for _ in range(config.eval_batches)]
    return EvalSets(spec_batches, generic_batches)


# ---- checkpoint ---------------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, objects: RunObjects, next_step: int, history: History) -> None:
    with atomic_path(path) as tmp:
        torch.save({"model": objects.model.state_dict(), "optimizer": objects.optimizer.state_dict(),
                    "mixer": objects.mixer.state_dict(), "step": next_step, "rows": history.rows, "drawn": history.drawn,
                    "alignment": history.alignment, "settings": objects.settings}, tmp)


def restore_checkpoint(path: Path, objects: RunObjects) -> tuple[int, History]:
    """Restore the run objects in place; returns the first step still to train and the history so far (the rows and
    the draws of the steps before the checkpoint belong in the outputs as much as the ones after it)."""
    state = torch.load(path, weights_only=False)
    saved = state.get("settings", objects.settings)  # checkpoints from before settings were saved: not checked
    differing = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in objects.settings.items() if saved.get(k) != v]
    if differing:
        raise ParamError(f"{path} was saved under other train settings ({'; '.join(differing)}); resume with the "
                         "same ones, or delete it to train from scratch")
    try:
        objects.model.load_state_dict(state["model"])
        objects.optimizer.load_state_dict(state["optimizer"])
        objects.mixer.load_state_dict(state["mixer"])
    except (StateMismatchError, RuntimeError, KeyError) as err:  # RuntimeError: torch's refusal of another model shape
        raise ParamError(f"{path} was saved by a run with other data or train parameters ({err}); delete it to "
                         "train from scratch") from err
    return state["step"], History(state["rows"], state["drawn"], state.get("alignment", []))


# ---- training -------------------------------------------------------------------------------------------------------
def train_step(objects: RunObjects, step: int) -> tuple[dict[str, Any], dict[int, int]]:
    """One optimizer step on the mixer's next batch, then the strategy's update. Returns the step's log row and the
    tokens it drew per cluster."""
    model, mixer, device, autocast = objects.model, objects.mixer, objects.device, objects.autocast
    batch = mixer.next_batch()
    tokens = batch["tokens"].to(device)
    with mixer.training_step():
        losses, loss = forward_backward(objects.forward or model.sequence_losses, objects.optimizer, tokens, device,
                                        autocast)
    mixer.observe(batch, sequence_losses=losses)
    objects.optimizer.step()
    drawn_with = batch["log"]  # the weights the batch was drawn with, whatever the update below does
    update = mixer.step()
    row: dict[str, Any] = {"step": step, "train_loss": float(loss.detach()),
                           "weights": mixer.weights.round(6).tolist(),
                           "tokens": tokens_per_basis(mixer.stream.mixture, drawn_with.weights,
                                                      drawn_with.tokens_per_cluster)}
    if update is not None:
        row.update(scores=np.round(update.scores, 8).tolist(), skipped=update.skipped)
    return row, drawn_with.tokens_per_cluster


def forward_backward(forward: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer,
                     tokens: torch.Tensor, device: str,
                     autocast: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The training step's forward and backward (the optimizer's step is the caller's): per-sequence losses and
    their mean, gradients in .grad. One function for the trainer and bench/train_speed.py, which times it."""
    with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
        losses = forward(tokens)
        loss = losses.mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return losses, loss


@torch.no_grad()
def evaluate(model: GPT, batches: list[torch.Tensor], device: str, autocast: torch.dtype | None) -> float:
    model.eval()
    losses = []
    for tokens in batches:
        with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
            losses.append(float(model.loss(tokens.to(device))))
    model.train()
    return float(np.mean(losses))


def train_loop(config: TrainConfig, objects: RunObjects, evals: EvalSets, start_step: int, history: History,
               checkpoint: Path) -> None:
    """Steps start_step..steps-1, appending to `history`; evaluates every eval_every steps and at the end, and
    checkpoints every checkpoint_every steps (not at the end: the outputs are the record of a complete run)."""
    for step in range(start_step, config.steps):
        row, drawn = train_step(objects, step)
        history.drawn.append((step, drawn))
        history.alignment += objects.mixer.strategy.drain_records()
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            row["spec_loss"] = evaluate(objects.model, evals.spec, objects.device, objects.autocast)
            row["generic_loss"] = evaluate(objects.model, evals.generic, objects.device, objects.autocast)
            log.info("train %s: step %d spec %.4f generic %.4f", config.strategy, step + 1, row["spec_loss"],
                     row["generic_loss"])
        history.rows.append(row)
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            save_checkpoint(checkpoint, objects, step + 1, history)


def run(params: dict[str, Any], strategy_name: str, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Train one strategy to completion (resuming from OUT/checkpoint.pt when present) and write its outputs into
    `out_dir` (default: `<train.output>/<strategy>`). Returns the run's summary and metrics in one mapping. The one
    entry point for programs that train (the DVC stage, the experiment harness)."""
    config = read_config(params, strategy_name)
    out = config.out_dir if out_dir is None else Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    objects = build_run(config)
    evals = load_eval_sets(config)
    checkpoint = out / "checkpoint.pt"
    start_step, history = 0, History()
    if checkpoint.exists():
        start_step, history = restore_checkpoint(checkpoint, objects)
        log.info("train %s: resumed at step %d", strategy_name, start_step)

    started = time.perf_counter()
    with torch_threads(config.threads):
        train_loop(config, objects, evals, start_step, history, checkpoint)
    seconds = time.perf_counter() - started

    metrics = run_metrics(history.rows, objects.mixer.names, objects.mixer.weights)
    summary = run_summary(config, history.rows, objects, seconds)
    write_outputs(out, history, objects.mixer.names, metrics, summary)
    checkpoint.unlink(missing_ok=True)  # the run is complete; its outputs are the record
    return summary | metrics


# ---- outputs ------------------------------------------------------------------------------------------------------
def run_metrics(rows: list[dict[str, Any]], names: list[str], weights: np.ndarray) -> dict[str, Any]:
    """Pure: metrics.json. Its scalars are the columns `dvc metrics show` puts in one table with every other
    stage's, so only the losses are scalars here; the lists (hidden by DVC) are read by bench/."""
    evals = [r for r in rows if "spec_loss" in r]
    return {"final_spec_loss": round(evals[-1]["spec_loss"], METRIC_DECIMALS),
            "final_generic_loss": round(evals[-1]["generic_loss"], METRIC_DECIMALS),
            "bases": list(names), "final_weights": weights.tolist()}


def run_summary(config: TrainConfig, rows: list[dict[str, Any]], objects: RunObjects,
                seconds: float) -> dict[str, Any]:
    """summary.json: how the run went, for a reader rather than for the metrics table."""
    evals = [r for r in rows if "spec_loss" in r]
    return {"strategy": config.strategy, "steps": config.steps, "seconds": seconds,
            "best_spec_loss": round(min(r["spec_loss"] for r in evals), METRIC_DECIMALS),
            "parameters": objects.model.num_params(),
            "skipped_updates": sum(1 for r in rows if r.get("skipped")),
            "clusters_repeated": int((objects.mixer.stream.passes_completed() > 0).sum()),
            "eval_seed": eval_seed(config),
            "precision": "fp32" if objects.autocast is None else str(objects.autocast).removeprefix("torch."),
            "compiled": isinstance(objects.forward, CompiledForward) and objects.forward.failed is None,
            "threads": torch.get_num_threads() if config.threads is None else config.threads,
            "spec_eval": f"held-out specialized set {config.target_eval} (train.target_eval)",
            "generic_eval": f"held-out generic documents {config.tokens / token_store.HELDOUT} "
                            "(tokenize.holdout_fraction)"}


def write_outputs(out_dir: Path, history: History, names: list[str], metrics: dict[str, Any],
                  summary: dict[str, Any]) -> None:
    write_log(history.rows, names, out_dir / "log.csv")
    write_drawn(history.drawn, out_dir / "clusters.parquet")
    if history.alignment:
        write_alignment(history.alignment, out_dir / "alignment.parquet")
    write_json(summary, out_dir / "summary.json")
    write_json(metrics, out_dir / "metrics.json")


def tokens_per_basis(mixture: Mixture, weights: np.ndarray, tokens_per_cluster: dict[int, int]) -> list[float]:
    """Pure: a batch's tokens attributed to the bases, each cluster's tokens split in proportion to alpha_j P_j(c)
    (which basis "sent" them, in expectation). Sums to the batch's tokens."""
    clusters = np.fromiter(tokens_per_cluster, dtype=np.int64)
    counts = np.fromiter(tokens_per_cluster.values(), dtype=np.float64)
    share = mixture.bases[:, clusters].toarray() * np.asarray(weights)[:, None]  # (m, clusters in the batch)
    share /= share.sum(axis=0, keepdims=True)
    return np.round(share @ counts, 3).tolist()


def write_drawn(drawn: Drawn, path: Path) -> None:
    steps = [step for step, per_cluster in drawn for _ in per_cluster]
    clusters = [c for _, per_cluster in drawn for c in per_cluster]
    tokens = [t for _, per_cluster in drawn for t in per_cluster.values()]
    with atomic_path(path) as tmp:
        pq.write_table(pa.table({"step": pa.array(steps, pa.int32()), "cluster": pa.array(clusters, pa.int32()),
                                 "tokens": pa.array(tokens, pa.int64())}), tmp)


def write_alignment(records: list[dict[str, Any]], path: Path) -> None:
    """(step, cluster, sequences, mean_alignment) per update window and cluster drawn in it."""
    table = pa.table({"step": pa.array([r["step"] for r in records], pa.int32()),
                      "cluster": pa.array([r["cluster"] for r in records], pa.int32()),
                      "sequences": pa.array([r["sequences"] for r in records], pa.int32()),
                      "mean_alignment": pa.array([r["mean_alignment"] for r in records], pa.float64())})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_log(rows: list[dict[str, Any]], names: list[str], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "train_loss", "spec_loss", "generic_loss", "skipped"]
                        + [f"w:{n}" for n in names] + [f"a:{n}" for n in names] + [f"t:{n}" for n in names])
        for r in rows:
            scores = r.get("scores", [""] * len(names))
            writer.writerow([r["step"], r["train_loss"], r.get("spec_loss", ""), r.get("generic_loss", ""),
                             r.get("skipped", "")] + r["weights"] + scores + r["tokens"])
