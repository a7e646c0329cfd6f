"""What every mixing strategy is: the `Strategy` protocol, the evidence a training step hands it, and the parts that
exact DGA and DoGE share (the alignment draw and its checks, the saved-settings check, the RNG fork).

A trainer drives any strategy the same way, without asking which one it is:

    with strategy.training_step(step):     # in-batch DGA pauses its hooks on the steps it does not score
        loss.backward()
    strategy.observe(Evidence(batch, sequence_losses, loss_scale))   # after each backward (micro-batch)
    optimizer.step()
    record = strategy.on_step(step)         # after the optimizer step: maybe an UpdateRecord

What a strategy needs from the trainer is declared as data in `needs` (`NEEDS` lists the words), so a trainer or an
integration checks it can provide them instead of testing the strategy's class. The stream owns the weights:
strategies read `stream.weights` and write `stream.set_weights()`; their own state holds no copy of them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Mapping, Protocol, runtime_checkable

import numpy as np
import torch

from ...core.errors import StateMismatchError
from ..dga import RULES
from ..distributed import rank_and_world_size, shard_bounds
from ..stream import MixtureStream, TargetSampler

# What a strategy may need from the trainer that drives it:
NEEDS = {
    "model": "the model and its loss function (`Mixer.attach(model, loss_fn=...)`)",
    "learning_rate": "the optimizer's current learning rate (`Mixer.attach(..., optimizer=...)`)",
    "backward_hooks": "observe() after every backward of the training step (hooks on the model read its gradients)",
    "sequence_losses": "observe() after every backward with the batch's per-sequence losses",
}


@dataclass(frozen=True)
class Evidence:
    """What one training micro-batch tells a strategy, handed to `observe` after its backward.

    batch: the stream's batch (its `cluster` and `prob` per sequence); sequence_losses: (n,) per-sequence training
    losses, for strategies that need them; loss_scale: each sequence's weight in the loss that was backpropagated
    (None: 1 / n, a mean over the batch; under gradient accumulation over A micro-batches, 1 / (n * A));
    grad_scaler: the GradScaler that multiplied the loss before this backward (read before its `update()`)."""

    batch: Mapping[str, Any]
    sequence_losses: torch.Tensor | np.ndarray | None = None
    loss_scale: float | None = None
    grad_scaler: Any = None  # the torch.amp.GradScaler whose scale the backward carried (fp16), if any


@dataclass
class UpdateRecord:
    step: int
    weights: list[float]
    scores: list[float]
    skipped: bool


@runtime_checkable
class Strategy(Protocol):
    """A mixing strategy over a stream's bases."""

    needs: frozenset[str]
    stream: MixtureStream

    def training_step(self, step: int) -> contextlib.AbstractContextManager:
        """The context the training forward and backward of `step` run in."""

    def observe(self, evidence: Evidence) -> None:
        """Learn from a micro-batch just backpropagated (a no-op for strategies that need nothing)."""

    def on_step(self, step: int) -> UpdateRecord | None:
        """After optimizer step `step` (0-based): maybe update the weights; the record of an update, else None."""

    def drain_records(self) -> list[dict[str, Any]]:
        """Per-cluster records since the last drain (in-batch DGA's alignment windows); cleared."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class StrategyBase:
    """Defaults for the parts of the protocol a strategy does not use."""

    needs: ClassVar[frozenset[str]] = frozenset()
    SETTINGS: ClassVar[tuple[str, ...]] = ()
    stream: MixtureStream

    @property
    def weights(self) -> np.ndarray:
        """The weights in force (the stream's: strategies hold no copy)."""
        return self.stream.weights

    def training_step(self, step: int) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def observe(self, evidence: Evidence) -> None:
        return None

    def on_step(self, step: int) -> UpdateRecord | None:
        return None

    def drain_records(self) -> list[dict[str, Any]]:
        return []

    def settings(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.SETTINGS}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.settings())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_settings(self, state, type(self).__name__)


def as_numpy(value: torch.Tensor | np.ndarray | Any) -> np.ndarray:
    """A batch field as a numpy array, wherever the trainer moved its tensors (they may be on the GPU)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def check_settings(strategy: Any, state: Mapping[str, Any], what: str) -> None:
    """Refuse a state saved under other settings (a resumed run would not be the run that was saved)."""
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


def own_rng(params: Iterable[torch.Tensor]) -> contextlib.AbstractContextManager:
    """Run alignment forwards (dropout in training mode) on a fork of the RNG: they leave the training's random
    stream where it was, so a trainer that restores its RNG state on resume (the Hugging Face Trainer, Lightning)
    resumes exactly, and training draws the same dropout masks with DGA on or off."""
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    return torch.random.fork_rng(devices=devices)


@dataclass
class AlignmentDraw:
    """Fresh alignment batches at each update, shared by exact DGA and DoGE: `micro_batches` target batches of
    `target_batch_size` sequences (drawn first), then as many batches of `batch_size` sequences from each basis.
    Under torch.distributed each rank reads its contiguous share of every batch (`shard_bounds`) while every rank
    plans the whole draw, so the state stays rank-independent and exactly resumable. The draw order is part of
    every run that uses it: it fixes which sequences each update scores."""

    stream: MixtureStream
    target: TargetSampler
    batch_size: int
    micro_batches: int
    target_batch_size: int

    def __post_init__(self) -> None:
        if min(self.batch_size, self.micro_batches, self.target_batch_size) < 1:
            raise ValueError(f"batch_size = {self.batch_size}, micro_batches = {self.micro_batches}, "
                                 f"target_batch_size = {self.target_batch_size}: expected >= 1")
        if not (np.asarray(self.stream.mixture.bases.sum(axis=1)).ravel() > 0).all():
            raise ValueError("a basis has no available tokens")
        self.check_shardable()  # early, where the process group already exists

    def check_shardable(self) -> None:
        """Every rank needs at least one sequence of each batch: a rank with none would have no loss to
        differentiate, and under FSDP it would skip the collectives of the others' forwards and backwards."""
        world = rank_and_world_size()[1]
        if min(self.batch_size, self.target_batch_size) < world:
            raise ValueError(f"batch_size = {self.batch_size}, target_batch_size = {self.target_batch_size} with "
                             f"world size {world}: the alignment batches are split across ranks, so expected "
                             f"both >= the world size ({world}), e.g. a multiple of it")

    def draw(self) -> tuple[list[list[torch.Tensor]], list[torch.Tensor], dict[str, float]]:
        """This rank's slices of one draw: (per-basis micro-batches, target micro-batches, {basis_share,
        target_share}), the shares being this rank's fraction of each batch's sequences (the estimators'
        share-weighting)."""
        self.check_shardable()
        rank, world = rank_and_world_size()
        target_batches = [self.target.sample(self.target_batch_size, rank, world) for _ in range(self.micro_batches)]
        bases = [[self.stream.sample_basis(j, self.batch_size, rank, world)["tokens"]
                  for _ in range(self.micro_batches)] for j in range(self.stream.mixture.n_bases)]

        def share(size: int) -> float:  # this rank's fraction of a batch of `size` sequences
            start, stop = shard_bounds(size, rank, world)
            return (stop - start) / size

        return bases, target_batches, {"basis_share": share(self.batch_size),
                                       "target_share": share(self.target_batch_size)}


class StrategySpec(Protocol):
    """A strategy's settings, before there is a stream or a model: a frozen dataclass with its defaults, one line of
    doc per field, `validate(section)` (errors name `section.field`), and `build(...)` once the `Mixer` has a stream,
    a target sampler and (after `attach`) a model."""

    needs: ClassVar[frozenset[str]]

    def validate(self, section: str = "strategy") -> None: ...

    def build(self, stream: MixtureStream, target: TargetSampler | None, attachment: "Attachment") -> Strategy: ...


def setting_error(section: str, name: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"{section}.{name} = {value!r}: expected {expected}")


def require_positive_int(section: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise setting_error(section, name, value, "a positive integer")


def check_rule_settings(section: str, rule: str, kl_cap: float | None, tau: float = 1.0) -> None:
    """The update rule's settings (`dga.RULES`), shared by exact and in-batch DGA."""
    if rule not in RULES:
        raise setting_error(section, "rule", rule, f"one of {', '.join(RULES)}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (tau > 0 and np.isfinite(tau)):
        raise setting_error(section, "tau", tau, "a positive prior scale of the relative gains")
    if kl_cap is not None and (isinstance(kl_cap, bool) or not isinstance(kl_cap, (int, float)) or not kl_cap > 0):
        raise setting_error(section, "kl_cap", kl_cap, "None or a positive number of nats")


def trainable_parameters(params: Iterable[torch.nn.Parameter], owner: str) -> list[torch.nn.Parameter]:
    """The parameters a strategy differentiates, as a list: a generator such as `model.parameters()` would be
    exhausted by the first update, leaving later ones nothing to differentiate."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError(f"{owner}: params holds no parameter that requires grad: expected the model's trainable "
                         "parameters, e.g. params=list(model.parameters())")
    return params


@dataclass(frozen=True)
class Attachment:
    """What `Mixer.attach` hands a strategy's builder: the model and how to compute its losses on token batches."""

    model: torch.nn.Module | None
    loss_fn: Callable[[torch.Tensor], torch.Tensor] | None  # tokens (n, seq_len + 1) -> mean LM loss
    sequence_loss_fn: Callable[[torch.Tensor], torch.Tensor] | None  # tokens -> (n,) per-sequence losses
    lr_fn: Callable[[], float] | None  # the optimizer's current learning rate

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad] if self.model is not None else []
