"""Mixer: the one object a training loop holds.

    from dgamix.mixer import DGA, Mixer

    mixer = Mixer.from_dirs("data/tokens", "data/bases", target="data/targets/spec/tokens", seq_len=64,
                            batch_size=16, seed=0, strategy=DGA(every=20), max_steps=1000)
    mixer.attach(model, loss_fn=model.loss)            # a strategy that scores with the model gets it here
    for batch in mixer.loader(num_workers=2):
        with mixer.training_step():                    # in-batch DGA pauses its hooks on unscored steps
            loss = model.loss(batch["tokens"].to(device))
            loss.backward()
        mixer.observe(batch)                           # after each backward (ODM: sequence_losses=...)
        optimizer.step(); optimizer.zero_grad()
        mixer.step()                                   # after the optimizer step: maybe new weights
        mixer.save(path, model=model, optimizer=optimizer)  # everything an exact resume needs, RNG states included
    # resume: build the same objects, then mixer.load(path, model=model, optimizer=optimizer) before the loop

It builds the stream (which owns the weights), the target sampler and the strategy from its settings
(`strategies.Static`, `DGA`, `InBatchDGA`, `DoGE`, `ODM`), counts the optimizer steps, and saves all of it in one
state, prefetched steps included. The parts stay public for those who wire them by hand.

Seeds: the training stream and the alignment draws each draw from their own seed, derived from the Mixer's `seed`
by purpose (`purpose_seed`). After the run's last optimizer step (`total_steps`) the strategy does not update: no
batch would ever be drawn with the new weights.
"""
from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..core.errors import StateMismatchError
from .distributed import rank_and_world_size
from .loader import MixtureLoader
from .mixture import Mixture
from .store import ClusterStore, check_same_tokenizer
from .strategies import Attachment, Evidence, Static, Strategy, StrategySpec, UpdateRecord
from .strategies.base import NEEDS
from .stream import MixtureStream, TargetSampler

STATE_VERSION = 1
STREAM, ALIGNMENT = "stream", "alignment"  # the purposes of the Mixer's own seeds (purpose_seed)


def purpose_seed(seed: int, purpose: str) -> int:
    """The seed of one purpose's draws (e.g. "stream", "alignment"), derived from a run's `seed`. Every consumer of
    randomness gets its own seed, so adding, removing or reordering one never moves another's draws, and no two
    consumers share a generator key (under one seed, the training store's and the target store's document orders
    are keyed alike, and one run's evaluation seed could be another run's training seed). Pure and stable across
    versions and platforms: numpy's SeedSequence of `seed` with the purpose's bytes as its spawn key; 32 bits, so
    every generator (numpy, torch) takes it."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed = {seed!r}: expected a non-negative integer")
    return int(np.random.SeedSequence(int(seed), spawn_key=tuple(purpose.encode())).generate_state(1)[0])


def rng_state() -> dict[str, Any]:
    """The global RNG states a training step draws from (dropout, data augmentation): python's `random`, numpy's
    legacy global generator, torch's CPU generator and, when CUDA is available, every CUDA device's. Plain Python
    and tensors, so `torch.load(weights_only=True)` reads it back (Lightning loads checkpoints that way)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {"python": random.getstate(),
                             "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos),
                                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state()` returned (CUDA's only where both the saved state and this process have it)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))  # tuples may come back as lists from other serialisations
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Mixer:
    """A mixture stream over `mixture`'s bases of `store`'s clusters, re-weighted by `strategy`.

    target: the specialized set (a one-cluster token store, its directory, or a `TargetSampler`), needed by the
    strategies that align with it. rank / world_size: this process's place among data-parallel ranks (default:
    torch.distributed's, else 0 of 1). max_steps: where the stream ends (None: never).

    seed: the run's seed. The stream's draws (which cluster each sequence comes from) use `purpose_seed(seed,
    "stream")`; the alignment draws (exact DGA's and DoGE's fresh batches per basis, and the document order of a
    `target` given as a directory) use `purpose_seed(seed, "alignment")`. A store passed in keeps its own seed (its
    document orders): `from_dirs` seeds the token store with the stream's seed.

    total_steps: the run's optimizer steps, when known (default: `max_steps`, one stream step per optimizer step;
    under gradient accumulation give it, or the integrations set it from the Trainer's max_steps). The strategy's
    update after the last of them is skipped: no batch is drawn with its weights, and exact DGA's and DoGE's
    alignment (forwards and backwards on fresh batches) would be computed for nothing."""

    def __init__(self, store: ClusterStore, mixture: Mixture, *, seq_len: int, batch_size: int, seed: int = 0,
                 strategy: StrategySpec | None = None, target: ClusterStore | TargetSampler | str | Path | None = None,
                 rank: int | None = None, world_size: int | None = None, max_steps: int | None = None,
                 total_steps: int | None = None):
        strategy = Static() if strategy is None else strategy
        if not hasattr(strategy, "build") or not hasattr(strategy, "needs"):
            raise TypeError(f"strategy = {strategy!r}: expected a strategy's settings, e.g. dgamix.mixer.DGA(every=20) "
                            "or Static(basis='importance')")
        strategy.validate()
        if (rank is None) != (world_size is None):
            raise ValueError(f"rank = {rank!r}, world_size = {world_size!r}: give both, or neither (then "
                             "torch.distributed's, or 0 of 1 without a process group)")
        if rank is None and world_size is None:
            rank, world_size = rank_and_world_size()
        self.seed = int(seed)
        alignment_seed = purpose_seed(seed, ALIGNMENT)
        self.stream = MixtureStream(store, mixture, seq_len, batch_size, seed=purpose_seed(seed, STREAM), rank=rank,
                                    world_size=world_size, max_steps=max_steps, alignment_seed=alignment_seed)
        if isinstance(target, (str, Path)):
            target = ClusterStore(target, seed=alignment_seed)
        self.target = TargetSampler(target, seq_len) if isinstance(target, ClusterStore) else target
        if self.target is not None:  # the same ids must mean the same text in both stores
            check_same_tokenizer(store, self.target.store, names=["the corpus's token store", "target"])
        if "model" in strategy.needs and self.target is None:
            raise ValueError(f"{type(strategy).__name__} aligns with the specialized set: give Mixer(..., target=<its "
                             "token store, e.g. data/targets/spec/tokens>)")
        self.settings, self.steps = strategy, 0
        self.total_steps = max_steps if total_steps is None else total_steps
        self.strategy: Strategy | None = None
        self._loader: MixtureLoader | None = None
        if "model" not in strategy.needs:
            self.strategy = strategy.build(self.stream, self.target, Attachment(None, None, None, None))

    @classmethod
    def from_dirs(cls, tokens: str | Path, bases: str | Path | None = None, *, seq_len: int, batch_size: int,
                  seed: int = 0, strategy: StrategySpec | None = None, target: str | Path | None = None,
                  basis_names: list[str] | None = None, token_cap: int | None = None,
                  **kwargs: Any) -> "Mixer":
        """From the pipeline's outputs: the token store (`tokenize` stage), the bases (`bases` stage; None: one
        basis per non-empty cluster, i.e. domain reweighting over every cluster; `basis_names`: a subset by name)
        and the specialized set's token store. Other keyword arguments go to `Mixer`."""
        store = ClusterStore(tokens, token_cap=token_cap, seed=purpose_seed(seed, STREAM))
        mixture = (Mixture.identity(store.available) if bases is None
                   else Mixture.from_bases_dir(bases, basis_names))
        return cls(store, mixture, seq_len=seq_len, batch_size=batch_size, seed=seed, strategy=strategy,
                   target=target, **kwargs)

    # ---- the model -------------------------------------------------------------------------------------------
    def attach(self, model: torch.nn.Module, *, loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
               sequence_loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
               optimizer: torch.optim.Optimizer | None = None,
               lr_fn: Callable[[], float] | None = None) -> "Mixer":
        """Give the strategy the model it scores with. loss_fn(tokens) -> the mean LM loss of a (n, seq_len + 1)
        token batch (default: `model.loss` when the model has one, else a Hugging Face causal LM's
        `model(input_ids=tokens, labels=tokens).loss`); tokens reach it on the model's device.
        sequence_loss_fn(tokens) -> (n,) losses lets DGA's forward estimators batch every basis. DoGE reads the
        learning rate from `optimizer` (or `lr_fn`). In-batch DGA installs its hooks on the model here. Returns the
        mixer. A strategy that needs no model ignores the call."""
        if "model" not in self.settings.needs:
            return self
        if self.strategy is not None:
            raise RuntimeError("this Mixer is already attached to a model: build another Mixer for another model")
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        loss = _default_loss_fn(model) if loss_fn is None else loss_fn
        on_device = lambda fn: (lambda tokens: fn(tokens.to(device)))  # noqa: E731
        if lr_fn is None and optimizer is not None:
            lr_fn = lambda: optimizer.param_groups[0]["lr"]  # noqa: E731  read at each update: schedules reach it
        if "learning_rate" in self.settings.needs and lr_fn is None:
            raise ValueError(f"{type(self.settings).__name__} reads the learning rate: attach(..., optimizer=...) or "
                             "lr_fn=<a callable returning it>")
        self.strategy = self.settings.build(
            self.stream, self.target,
            Attachment(model, on_device(loss), None if sequence_loss_fn is None else on_device(sequence_loss_fn),
                       lr_fn))
        return self

    @property
    def needs(self) -> frozenset[str]:
        """What the strategy needs from the training loop (`strategies.base.NEEDS` says what each word means)."""
        return self.settings.needs

    def _strategy(self) -> Strategy:
        if self.strategy is None:
            raise RuntimeError(f"{type(self.settings).__name__} scores with the model: call mixer.attach(model, "
                               "loss_fn=...) before training")
        return self.strategy

    # ---- data --------------------------------------------------------------------------------------------------
    def loader(self, num_workers: int = 0, transform: Callable[[dict[str, Any]], Any] | None = None,
               **dataloader_kwargs: Any) -> MixtureLoader:
        """The batches as a DataLoader with `num_workers` workers (planned here, so weight changes reach every
        worker). The mixer's state follows this loader's position (prefetched steps are re-planned on resume)."""
        self._loader = MixtureLoader(self.stream, num_workers=num_workers, transform=transform, **dataloader_kwargs)
        return self._loader

    def next_batch(self) -> dict[str, Any]:
        """The next batch, planned and read in this process (no DataLoader)."""
        if self._loader is not None and self._loader.next_step != self.stream.step:
            raise RuntimeError("this Mixer's loader() has planned steps it has not handed out: take batches from one "
                               "of loader() and next_batch(), not both")
        batch = self.stream.next_batch()
        if self._loader is not None:
            self._loader.next_step = self.stream.step
        return batch

    # ---- the training loop -------------------------------------------------------------------------------------
    def training_step(self) -> contextlib.AbstractContextManager:
        """The context the forward and backward of the current step run in (all its micro-batches)."""
        return self._strategy().training_step(self.steps)

    def observe(self, batch: dict[str, Any], sequence_losses: torch.Tensor | np.ndarray | None = None,
                loss_scale: float | None = None, grad_scaler: Any = None) -> None:
        """After each backward: the batch just trained on, its (n,) per-sequence losses (ODM needs them) and each
        sequence's weight in the loss backpropagated (default 1 / n; under gradient accumulation over A
        micro-batches of a mean loss divided by A, 1 / (n * A)); with fp16 training, the `torch.amp.GradScaler`
        that scaled the loss (before its `update()`): its scale is divided out, and a backward that overflowed is
        not scored (the scaler skips that step too). A no-op for strategies that learn nothing from the training
        step."""
        strategy = self._strategy()
        if "sequence_losses" in strategy.needs and sequence_losses is None:
            raise ValueError(f"{type(strategy).__name__} learns from each sequence's training loss: "
                             "mixer.observe(batch, sequence_losses=<(n,) losses>)")
        strategy.observe(Evidence(batch, sequence_losses, loss_scale, grad_scaler))

    def step(self) -> UpdateRecord | None:
        """After each optimizer step: counts it and lets the strategy update the weights (from the next step
        planned). Returns the update's record, or None. After the run's last step (`total_steps`) the strategy is
        not called: its new weights would never be drawn with, and an update there costs as much as any other
        (exact DGA and DoGE: forwards and backwards on fresh batches of every basis and the target; in-batch DGA:
        its target gradient's refresh). The weights then stay the ones the last batch was drawn with."""
        strategy = self._strategy()
        final = self.total_steps is not None and self.steps + 1 == self.total_steps
        record = None if final else strategy.on_step(self.steps)
        self.steps += 1
        return record

    @property
    def weights(self) -> np.ndarray:
        """The weights over the bases in force (a copy)."""
        return self.stream.weights

    @property
    def vocab_size(self) -> int:
        """The token store's vocabulary size (what the model's embedding needs)."""
        return self.stream.store.vocab_size

    @property
    def names(self) -> list[str]:
        """The bases' names, in the weights' order."""
        return list(self.stream.mixture.names)

    # ---- state -------------------------------------------------------------------------------------------------
    def state_dict(self, next_step: int | None = None) -> dict[str, Any]:
        """Stream (weights and positions), strategy (with its target sampler) and step count in one plain-Python
        state. `next_step`: the first stream step not yet trained on, for trainers that count it themselves
        (default: the loader's count when `loader()` made one, else the stream's)."""
        if next_step is None and self._loader is not None:
            next_step = self._loader.next_step
        return {"version": STATE_VERSION, "strategy_kind": type(self.settings).__name__,
                "stream": self.stream.state_dict(next_step=next_step), "strategy": self._strategy().state_dict(),
                "steps": self.steps}

    def save(self, path: str | Path, *, model: torch.nn.Module | None = None,
             optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
             extra: dict[str, Any] | None = None) -> None:
        """One checkpoint file for a plain training loop, written after `mixer.step()`: the mixer's state, the
        model's, the optimizer's and the scheduler's (those given), `extra` (plain values of your own, e.g. the
        best loss) and the global RNG states (`rng_state()`), without which a model with dropout would draw other
        masks after a resume. `load` restores all of it."""
        checkpoint: dict[str, Any] = {"mixer": self.state_dict(), "rng": rng_state(), "extra": dict(extra or {})}
        for key, part in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler)):
            if part is not None:
                checkpoint[key] = part.state_dict()
        torch.save(checkpoint, path)

    def load(self, path: str | Path, *, model: torch.nn.Module | None = None,
             optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None) -> dict[str, Any]:
        """Restore a checkpoint written by `save` into the same objects built again (this mixer, and the model,
        optimizer and scheduler given, each of which must have been saved), RNG states last, so that the next
        step draws what the uninterrupted run drew. Call it before iterating `loader()` (the loader draws its
        workers' seed from a generator of its own, not from the global RNG). Returns the `extra` values."""
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        for key, part in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler)):
            if part is not None:
                if key not in checkpoint:
                    raise KeyError(f"{path}: the checkpoint has no {key} state (Mixer.save(..., {key}=...) saves it)")
                part.load_state_dict(checkpoint[key])
        self.load_state_dict(checkpoint["mixer"])
        set_rng_state(checkpoint["rng"])
        return checkpoint["extra"]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise StateMismatchError(f"mixer state version {state.get('version')}, expected {STATE_VERSION}")
        strategy, kind = self._strategy(), type(self.settings).__name__
        if state.get("strategy_kind") != kind:
            raise StateMismatchError(f"the saved mixer state was made by the {state.get('strategy_kind')} strategy; "
                                     f"this mixer runs {kind}: resume with the strategy the run was saved with")
        self.stream.load_state_dict(state["stream"])
        strategy.load_state_dict(state["strategy"])
        self.steps = int(state["steps"])
        if self._loader is not None:
            self._loader.next_step = self.stream.step


def _default_loss_fn(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's own mean LM loss: `model.loss(tokens)`, or a Hugging Face causal LM's (labels = inputs; the model
    shifts them)."""
    if callable(getattr(model, "loss", None)):
        return model.loss
    if hasattr(model, "config") and hasattr(model, "generation_config"):  # a transformers PreTrainedModel
        return lambda tokens: model(input_ids=tokens, labels=tokens).loss
    raise ValueError(f"{type(model).__name__} has no `loss(tokens)` method: attach(model, loss_fn=<tokens -> mean LM "
                     "loss>)")


__all__ = ["Mixer", "NEEDS", "purpose_seed", "rng_state", "set_rng_state"]
