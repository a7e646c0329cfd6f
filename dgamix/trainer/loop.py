"""The training loop of the reference trainer: the run's objects (model, optimizer, mixer), evaluation sets,
checkpoints, and the step. `TrainingRun` is the one object programs drive (`train.run` for a whole run; step by
step for timing).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..core.atomic import atomic_path
from ..core.errors import ParamError, StateMismatchError
from ..formats import token_store
from ..mixer import ClusterStore, Mixer, Mixture, TargetSampler
from ..mixer.store import check_same_tokenizer
from .config import RunConfig, read_config, seeds_for
from .hardware import make_optimizer, resolve_device, torch_threads, training_forward
from .model import GPT, GPTConfig
from .outputs import Drawn, tokens_per_basis

log = logging.getLogger(__name__)
TARGET_HINT = "run the target stages first (`dvc repro`, or `dgamix tokenize --target {name}`)"


# ---- the model's initialization -------------------------------------------------------------------------------------
def init_model(config: GPTConfig, seed: int) -> GPT:
    """The model with its initial parameters drawn from `seed` alone: on a fork of torch's CPU generator (the
    parameters are drawn on the CPU), so neither what was drawn before nor the model's size reaches anything else."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        return GPT(config)


# ---- run objects (reads the stores) ------------------------------------------------------------------------------
@dataclass
class RunObjects:
    """Everything a training step touches. Its checkpointed state is what a resumed run restores."""

    model: GPT
    optimizer: torch.optim.Optimizer
    mixer: Mixer
    device: str
    autocast: torch.dtype | None
    # The training step's forward: model.sequence_losses, or its torch.compile'd form (train.speed.compile). Evaluation
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


def open_store(directory: Path, param: str, stage_hint: str, seed: int) -> ClusterStore:
    """A one-cluster token store named by a `train.*` path, with an error that says which stage writes it."""
    if not (directory / token_store.META).exists():
        raise ParamError(f"{param} = '{directory}' holds no token store ({token_store.META}): {stage_hint}")
    return ClusterStore(directory, seed=seed)


def build_run(config: RunConfig) -> RunObjects:
    """Model, optimizer and mixer. Each random consumer draws from its own seed (`seeds_for`), so the order in which
    they are built changes no draw; a run reproduces byte for byte."""
    train, data = config.train, config.train.data
    seeds = seeds_for(train.seed)
    device, autocast = resolve_device(train.speed.precision)
    store = ClusterStore(train.paths.tokens, token_cap=data.token_cap, seed=seeds.stream)
    mixture = Mixture.from_bases_dir(train.paths.bases, data.basis_names)
    if config.strategy == "odm":
        mixture = domain_mixture(mixture, store)
    elif config.strategy == "inbatch_domains":  # domain reweighting over every fine cluster that has tokens
        mixture = Mixture.identity(store.available)
    target = TargetSampler(open_store(train.paths.target, "train.paths.target", TARGET_HINT.format(name="spec"),
                                      seeds.alignment), data.seq_len)
    try:
        # max_steps: the Mixer then skips the strategy's update after the last step, which nothing would train on.
        mixer = Mixer(store, mixture, seq_len=data.seq_len, batch_size=data.batch_size, seed=train.seed,
                      strategy=config.strategy_settings(), target=target, rank=0, world_size=1,
                      max_steps=train.steps)
    except ValueError as err:  # what the parameters cannot tell in advance, e.g. a basis with no tokens
        raise ParamError(f"train: {err}") from err
    model = init_model(GPTConfig(vocab_size=store.vocab_size, block_size=data.seq_len, n_layer=train.model.n_layer,
                                 n_head=train.model.n_head, n_embd=train.model.n_embd), seeds.model).to(device)
    optimizer = make_optimizer(model, train.optim.lr, train.optim.adamw_impl)
    try:
        mixer.attach(model, loss_fn=model.loss, sequence_loss_fn=model.sequence_losses, optimizer=optimizer)
    except ValueError as err:
        raise ParamError(f"train: {err}") from err
    forward = training_forward(model, train.speed.compile, config.strategy)
    torch.manual_seed(seeds.dropout)  # last: whatever the objects above drew, training starts from this state
    settings = {"autocast": str(autocast), "compile": train.speed.compile, "adamw_impl": train.optim.adamw_impl,
                "eval_seed": train.eval.seed}
    return RunObjects(model, optimizer, mixer, device, autocast, forward, settings)


def domain_mixture(mixture: Mixture, store: ClusterStore) -> Mixture:
    """ODM needs disjoint domains: the coarse bases when present, else one domain per cluster."""
    coarse = [n for n in mixture.names if n.startswith("coarse:")]
    return mixture.select(coarse) if coarse else Mixture.identity(store.available)


@dataclass
class EvalSets:
    """Fixed evaluation batches, drawn once: the held-out specialized set and the held-out generic documents."""

    spec: list[torch.Tensor]
    generic: list[torch.Tensor]


def eval_seed(config: RunConfig) -> int:
    """The seed of the evaluation draws. null: the run seed's evaluation seed (`seeds_for(seed).eval`), so every
    training seed is evaluated on its own batches. An int: the same batches for every seed and strategy, so the
    spread over seeds measures training, not which batches were drawn."""
    train = config.train
    return seeds_for(train.seed).eval if train.eval.seed is None else train.eval.seed


def load_eval_sets(config: RunConfig) -> EvalSets:
    seed, data, paths, n = eval_seed(config), config.train.data, config.train.paths, config.train.eval.batches
    spec = TargetSampler(open_store(paths.target_eval, "train.paths.target_eval", TARGET_HINT.format(name="eval"),
                                    seed), data.seq_len)
    check_same_tokenizer(paths.tokens, spec.store, names=["train.paths.tokens", "train.paths.target_eval"])
    spec_batches = [spec.sample(data.batch_size) for _ in range(n)]
    generic = TargetSampler(open_store(paths.tokens / token_store.HELDOUT, "train.paths.tokens (its heldout/ store)",
                                       "run the tokenize stage with tokenize.holdout_fraction > 0",
                                       seed), data.seq_len)
    generic_batches = [generic.sample(data.batch_size) for _ in range(n)]
    return EvalSets(spec_batches, generic_batches)


# ---- checkpoint ---------------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, objects: RunObjects, next_step: int, history: History) -> None:
    with atomic_path(path) as tmp:
        torch.save({"model": objects.model.state_dict(), "optimizer": objects.optimizer.state_dict(),
                    "mixer": objects.mixer.state_dict(), "step": next_step, "rows": history.rows,
                    "drawn": history.drawn,
                    "alignment": history.alignment, "settings": objects.settings}, tmp)


def restore_checkpoint(path: Path, objects: RunObjects) -> tuple[int, History]:
    """Restore the run objects in place; returns the first step still to train and the history so far (the rows and
    the draws of the steps before the checkpoint belong in the outputs as much as the ones after it)."""
    state = torch.load(path, weights_only=False)
    saved = state["settings"]
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


def train_loop(config: RunConfig, objects: RunObjects, evals: EvalSets, start_step: int, history: History,
               checkpoint: Path) -> None:
    """Steps start_step..steps-1, appending to `history`; evaluates every eval.every steps and at the end, and
    checkpoints every checkpoint_every steps (not at the end: the outputs are the record of a complete run)."""
    train = config.train
    for step in range(start_step, train.steps):
        row, drawn = train_step(objects, step)
        history.drawn.append((step, drawn))
        history.alignment += objects.mixer.strategy.drain_records()
        if (step + 1) % train.eval.every == 0 or step + 1 == train.steps:
            row["spec_loss"] = evaluate(objects.model, evals.spec, objects.device, objects.autocast)
            row["generic_loss"] = evaluate(objects.model, evals.generic, objects.device, objects.autocast)
            log.info("train %s: step %d spec %.4f generic %.4f", config.strategy, step + 1, row["spec_loss"],
                     row["generic_loss"])
        history.rows.append(row)
        if (step + 1) % train.checkpoint_every == 0 and step + 1 < train.steps:
            save_checkpoint(checkpoint, objects, step + 1, history)


class TrainingRun:
    """One run of the reference trainer, built from params.yaml's `train` section: the objects, the evaluation sets
    and the history, with the steps to drive it. `train.run` trains it to completion and writes its outputs;
    benchmarks step it themselves (`step`, `evaluate`)."""

    def __init__(self, params: dict[str, Any], strategy: str, out_dir: str | Path | None = None):
        self.config = read_config(params, strategy)
        self.out_dir = self.config.out_dir if out_dir is None else Path(out_dir)
        self.objects = build_run(self.config)
        self.evals = load_eval_sets(self.config)
        self.history = History()
        self.next_step = 0

    @property
    def checkpoint(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    def resume(self) -> bool:
        """Restore the run from its checkpoint when there is one; whether it did."""
        if not self.checkpoint.exists():
            return False
        self.next_step, self.history = restore_checkpoint(self.checkpoint, self.objects)
        log.info("train %s: resumed at step %d", self.config.strategy, self.next_step)
        return True

    def step(self) -> dict[str, Any]:
        """One training step (no evaluation, no checkpoint); its log row."""
        with torch_threads(self.config.train.speed.threads):
            row, drawn = train_step(self.objects, self.next_step)
        self.history.drawn.append((self.next_step, drawn))
        self.history.alignment += self.objects.mixer.strategy.drain_records()
        self.history.rows.append(row)
        self.next_step += 1
        return row

    def evaluate(self) -> tuple[float, float]:
        """(specialized loss, generic loss) on the fixed evaluation batches."""
        objects = self.objects
        with torch_threads(self.config.train.speed.threads):
            return (evaluate(objects.model, self.evals.spec, objects.device, objects.autocast),
                    evaluate(objects.model, self.evals.generic, objects.device, objects.autocast))

    def train(self) -> None:
        """The remaining steps, with evaluations and checkpoints."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with torch_threads(self.config.train.speed.threads):
            train_loop(self.config, self.objects, self.evals, self.next_step, self.history, self.checkpoint)
        self.next_step = self.config.train.steps
