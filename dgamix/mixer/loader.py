"""Batches planned by the process that owns the weights, read by any number of DataLoader workers.

A step has a cheap, stateful half (which clusters, which stream positions: `MixtureStream.plan_step`) and an
expensive, stateless half (reading the tokens from the memory-mapped store: `MixtureStream.read`). This module
splits them across processes:

- `StepPlanner`, a batch sampler, plans this rank's slice of each step in the main process, with the weights in
  force: a strategy's `set_weights()` reaches the next step it plans, whatever the number of workers.
- `TokenReader`, a map-style dataset with no state of its own, reads a planned step in a worker.
- `MixtureLoader`, a `torch.utils.data.DataLoader` over them (as torchdata's `StatefulDataLoader` and Mosaic's
  `StreamingDataLoader` are DataLoaders), owns the one state to save.

Tokens: a batch's `tokens` are int64 by default (what an embedding lookup and a cross-entropy target need). With
workers, the tokens travel from the worker in the store's dtype (uint16 for vocabularies up to 65,536: a quarter
of the bytes) and the whole batch travels by value through the worker's pipe (torch sends each tensor as a
shared-memory file, a round trip to the worker per tensor, which cost more than the batch's reading), and this
loader's iterator rebuilds the tensors and widens the tokens to int64 in the main process (in the pin-memory thread
with `pin_memory=True`, into pinned memory). `widen=False` hands the tokens out in the store's dtype instead, for a
loop that widens them on the device (`batch["tokens"].to(device, non_blocking=True).long()`: a quarter of the
host-to-device bytes); torch supports uint16 and uint32 tensors only partly (conversion, indexing and copies; not
arithmetic, embedding lookups or cross-entropy targets). A trainer that rebuilds the DataLoader from its parts
(accelerate does) iterates without this class's iterator: its workers widen the tokens themselves and send them as
before.

Prefetching: with W workers and prefetch factor F the DataLoader plans W * F steps ahead of the batch handed out
(none in-process), so a weight change made after batch t is handed out reaches step t + 1 in-process and step
t + W * F + 1 with workers. The lag is part of the saved state: `MixtureLoader.stream_state()` records the first step
not yet handed to the trainer and the weights the steps planned after it were planned with, and a resumed run
re-plans them exactly (`MixtureStream.state_dict`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .plan import SNAPSHOTS_KEPT, PlannedStep
from .stream import MixtureStream


class StepPlanner(Sampler):
    """Yields `[PlannedStep]` per step (a batch of one plan), planned in the process iterating it."""

    def __init__(self, stream: MixtureStream):
        self.stream = stream

    def __iter__(self) -> Iterator[list[PlannedStep]]:
        while self.stream.max_steps is None or self.stream.step < self.stream.max_steps:
            yield [self.stream.plan_step()]

    # No __len__, on purpose: the remaining steps change with every resume, and trainers that see a length derive
    # epochs and schedules from it (the Hugging Face Trainer would stretch its schedule over "epochs" of the
    # remainder). Trainers count optimizer steps instead (max_steps).


class TokenReader(Dataset):
    """Reads a planned step's tokens, in the store's dtype (the collate function widens them); holds nothing that
    changes during training, so workers' copies are exact."""

    def __init__(self, stream: MixtureStream):
        self.stream = stream

    def __getitem__(self, planned: PlannedStep) -> dict[str, Any]:
        return self.stream.read(planned, widen=False)


class _OneStep:
    """The collate function: each "batch" of the planner is one planned step, already a batch; its tokens widened
    to int64 (unless `widen` is False), then `transform`ed. A class, not a lambda, so that workers started by spawn
    or forkserver can unpickle it."""

    def __init__(self, transform: Callable[[dict[str, Any]], Any] | None, widen: bool = True):
        self.transform, self.widen = transform, widen

    def __call__(self, items: list[dict[str, Any]]) -> Any:
        batch = items[0]
        if self.widen:
            batch["tokens"] = batch["tokens"].long()
        return batch if self.transform is None else self.transform(batch)


class _Packing(_OneStep):
    """The collate function the workers of `MixtureLoader`'s own iterator run: the same batch, packed for the trip
    to the main process (`_Packed`), where the iterator unpacks it. The transform still sees int64 tokens (unless
    `widen` is False); what it returns as the tokens tensor itself travels narrow and is widened on arrival."""

    def __call__(self, items: list[dict[str, Any]]) -> Any:
        batch = items[0]
        narrow = batch["tokens"]
        if self.widen and self.transform is not None:
            batch["tokens"] = narrow.long()
        tokens = batch["tokens"]
        out = batch if self.transform is None else self.transform(batch)
        return _Packed(out, tokens, narrow.numpy(), self.widen)  # (numpy(): the store-dtype array, not a copy)


class _ByValue:
    """A CPU tensor in transit as its numpy array, pickled into the worker's pipe with the rest of the batch."""
    __slots__ = ("array", "widen")

    def __init__(self, array: np.ndarray, widen: bool):
        self.array, self.widen = array, widen

    def __getstate__(self) -> tuple[np.ndarray, bool]:
        return self.array, self.widen

    def __setstate__(self, state: tuple[np.ndarray, bool]) -> None:
        self.array, self.widen = state

    def tensor(self, pin: bool) -> torch.Tensor:
        source = torch.from_numpy(self.array)
        if not self.widen:
            return source.pin_memory() if pin else source
        if not pin:
            return source.long()
        # Widened straight into pinned memory: one copy, not a widening and then a pinning copy.
        return torch.empty(source.shape, dtype=torch.int64, pin_memory=True).copy_(source)


def _by_value(tensor: torch.Tensor) -> _ByValue | torch.Tensor:
    # Only plain dense CPU tensors have a numpy twin (not bfloat16, not autograd's, not subclasses); the others
    # travel as torch sends them.
    if type(tensor) is not torch.Tensor or tensor.requires_grad or tensor.layout != torch.strided \
            or tensor.device.type != "cpu":
        return tensor
    try:
        return _ByValue(tensor.numpy(), widen=False)
    except (TypeError, RuntimeError):
        return tensor


class _Packed:
    """A collated batch in transit from a worker: its tensors replaced by `_ByValue`s (the tokens by their narrow
    array, marked for widening). `unpack()` restores the structure (dicts, lists, tuples, named tuples) with
    tensors; the DataLoader's pin-memory thread calls `pin_memory()`, which unpacks into pinned memory."""

    def __init__(self, batch: Any, tokens: torch.Tensor, narrow: np.ndarray, widen: bool):
        # One _ByValue per tensor object, so that a tensor the batch holds twice (input_ids and labels) arrives
        # as one tensor, as it left.
        seen: dict[int, Any] = {id(tokens): _ByValue(narrow, widen)}

        def pack(tensor: torch.Tensor) -> Any:
            if id(tensor) not in seen:
                seen[id(tensor)] = _by_value(tensor)
            return seen[id(tensor)]

        self.batch = _map_tensors(batch, pack, (torch.Tensor,))

    def unpack(self, pin: bool = False) -> Any:
        made: dict[int, torch.Tensor] = {}

        def unpack(value: _ByValue) -> torch.Tensor:
            if id(value) not in made:
                made[id(value)] = value.tensor(pin)
            return made[id(value)]

        return _map_tensors(self.batch, unpack, (_ByValue,))

    def pin_memory(self, device: Any = None) -> Any:
        return self.unpack(pin=True)


def _map_tensors(data: Any, fn: Callable[[Any], Any], kinds: tuple[type, ...]) -> Any:
    """`data` with `fn` applied to each leaf of the given kinds, through dicts, lists and tuples (as torch's
    pin_memory walks a batch); other objects are kept as they are."""
    if isinstance(data, kinds):
        return fn(data)
    if isinstance(data, Mapping):
        items = {k: _map_tensors(v, fn, kinds) for k, v in data.items()}
        try:
            return type(data)(items)
        except TypeError:  # a mapping type that cannot be built from a dict
            return items
    if isinstance(data, tuple):
        values = [_map_tensors(v, fn, kinds) for v in data]
        return type(data)(*values) if hasattr(data, "_fields") else type(data)(values)
    if isinstance(data, list):
        return [_map_tensors(v, fn, kinds) for v in data]
    return data


class MixtureLoader(DataLoader):
    """The stream's batches through a DataLoader with `num_workers` workers, planned in this process.

    Iterate it like any DataLoader (each item is `MixtureStream.next_batch()`'s dict, or `transform(dict)`), change
    the weights at any time (they apply from the next step planned), and save `stream_state()`: it resumes exactly,
    prefetched steps included. Iterating it again after a `break`, or iterating a new loader over the same stream
    (or `next_batch()`), continues at the next step not handed out. The iteration ends at the stream's `max_steps`.
    Trainers that rebuild the DataLoader they are given (accelerate does) lose this class's step count: their
    integrations (`dgamix.integrations`) count the trained steps themselves.

    widen: the batches' `tokens` are int64 (default), widened in this process after the trip from the workers; with
    False they stay in the store's dtype (uint16 or uint32), for a loop that widens them on the device (see the
    module's notes). `pin_memory=True` (a DataLoader argument) hands the tensors out in pinned memory. Other keyword
    arguments go to the DataLoader."""

    def __init__(self, stream: MixtureStream, num_workers: int = 0,
                 transform: Callable[[dict[str, Any]], Any] | None = None, widen: bool = True,
                 **dataloader_kwargs: Any):
        if not isinstance(widen, bool):
            raise ValueError(f"widen = {widen!r}: expected True (int64 tokens) or False (the store's dtype)")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers = {num_workers!r}: expected a non-negative integer")
        for key in ("batch_size", "shuffle", "sampler", "batch_sampler", "collate_fn", "drop_last"):
            if key in dataloader_kwargs:
                raise ValueError(f"MixtureLoader(..., {key}=...): each batch is one planned step of the stream "
                                 f"({stream.batch_size} sequences), so the loader sets {key} itself")
        ahead = num_workers * (dataloader_kwargs.get("prefetch_factor") or 2) + 1
        if ahead > SNAPSHOTS_KEPT:
            raise ValueError(f"num_workers = {num_workers} with prefetch_factor "
                             f"{dataloader_kwargs.get('prefetch_factor') or 2} plans {ahead} steps ahead; the stream "
                             f"can save a position at most {SNAPSHOTS_KEPT} steps behind its planning")
        # Starting an iteration draws a seed for the workers from the DataLoader's generator, by default torch's
        # global RNG: a resumed loop that restored the RNG state and then started the loader would draw other dropout
        # masks than the straight run. The workers draw nothing random (they read planned steps), so a generator of
        # the loader's own leaves the global RNG where the training loop put it.
        dataloader_kwargs.setdefault("generator", torch.Generator().manual_seed(stream.seed))
        # collate_fn is what a trainer that rebuilds the DataLoader copies (and its workers run): whole int64
        # batches. This class's own iterator gives its workers the packing one instead (__iter__).
        super().__init__(TokenReader(stream), batch_sampler=StepPlanner(stream), num_workers=num_workers,
                         collate_fn=_OneStep(transform, widen), **dataloader_kwargs)
        self.stream, self.transform, self.widen = stream, transform, widen
        self._packing = _Packing(transform, widen)
        self.next_step = stream.next_to_hand_out  # the first step not yet handed out

    def __iter__(self) -> Iterator[Any]:
        # The stream knows where the last batch handed out left it, whoever handed it out (this loader's last pass,
        # another loader over the stream, next_batch()).
        self.next_step = self.stream.next_to_hand_out
        if self.stream.step != self.next_step:
            # A previous iteration stopped with steps planned but never handed out: plan them again, as they were.
            self.stream.load_state_dict(self.stream.state_dict(next_step=self.next_step))
        for batch in self._batches():
            if isinstance(batch, _Packed):  # (without pin_memory: the pin-memory thread has not unpacked it)
                batch = batch.unpack()
            self.next_step += 1
            # Before the trainer sees the batch, and after the DataLoader planned its prefetch for this step: if
            # the trainer stops here, the steps planned beyond are known not handed out.
            self.stream.mark_handed_out(self.next_step)
            yield batch

    def _batches(self) -> Iterator[Any]:
        """The DataLoader's iterator; its workers (started here) collate with the packing function."""
        if self.num_workers == 0:
            return super().__iter__()
        plain = self.collate_fn
        self.collate_fn = self._packing
        try:
            return super().__iter__()
        finally:
            self.collate_fn = plain

    @property
    def dataloader(self) -> "MixtureLoader":
        """The loader itself (it is a DataLoader), for code that asks a loader for its `.dataloader`."""
        return self

    # Not named state_dict / load_state_dict: Lightning saves and restores any DataLoader that has them, at the
    # position its fetcher reached (a batch ahead of training), after the callbacks have restored the true one.
    def stream_state(self) -> dict[str, Any]:
        """The stream's state after the last step handed out (the steps planned beyond it are re-planned on
        resume with the weights they were planned with). `Mixer.state_dict()` holds it."""
        return self.stream.state_dict(next_step=self.next_step)

    def load_stream_state(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
        self.next_step = self.stream.step
