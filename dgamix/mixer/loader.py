"""Batches planned by the process that owns the weights, read by any number of DataLoader workers.

A step has a cheap, stateful half (which clusters, which stream positions: `MixtureStream.plan_step`) and an
expensive, stateless half (reading the tokens from the memory-mapped store: `MixtureStream.read`). This module
splits them across processes:

- `StepPlanner`, a batch sampler, plans this rank's slice of each step in the main process, with the weights in
  force: a strategy's `set_weights()` reaches the next step it plans, whatever the number of workers.
- `TokenReader`, a map-style dataset with no state of its own, reads a planned step in a worker.
- `MixtureLoader`, a `torch.utils.data.DataLoader` over them (as torchdata's `StatefulDataLoader` and Mosaic's
  `StreamingDataLoader` are DataLoaders), owns the one state to save.

Prefetching: with W workers and prefetch factor F the DataLoader plans W * F steps ahead of the batch handed out
(none in-process), so a weight change made after batch t is handed out reaches step t + 1 in-process and step
t + W * F + 1 with workers. The lag is part of the saved state: `MixtureLoader.stream_state()` records the first step
not yet handed to the trainer and the weights the steps planned after it were planned with, and a resumed run
re-plans them exactly (`MixtureStream.state_dict`).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

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
    """Reads a planned step's tokens; holds nothing that changes during training, so workers' copies are exact."""

    def __init__(self, stream: MixtureStream):
        self.stream = stream

    def __getitem__(self, planned: PlannedStep) -> dict[str, Any]:
        return self.stream.read(planned)


class _OneStep:
    """The collate function: each "batch" of the planner is one planned step, already a batch (a class, not a
    lambda, so that workers started by spawn or forkserver can unpickle it)."""

    def __init__(self, transform: Callable[[dict[str, Any]], Any] | None):
        self.transform = transform

    def __call__(self, items: list[dict[str, Any]]) -> Any:
        return items[0] if self.transform is None else self.transform(items[0])


class MixtureLoader(DataLoader):
    """The stream's batches through a DataLoader with `num_workers` workers, planned in this process.

    Iterate it like any DataLoader (each item is `MixtureStream.next_batch()`'s dict, or `transform(dict)`), change
    the weights at any time (they apply from the next step planned), and save `stream_state()`: it resumes exactly,
    prefetched steps included. Iterating it again after a `break` continues at the next step not handed out.
    Trainers that rebuild the DataLoader they are given (accelerate does) lose this class's step count: their
    integrations (`dgamix.integrations`) count the trained steps themselves. Other keyword arguments go to the
    DataLoader."""

    def __init__(self, stream: MixtureStream, num_workers: int = 0,
                 transform: Callable[[dict[str, Any]], Any] | None = None, **dataloader_kwargs: Any):
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
        super().__init__(TokenReader(stream), batch_sampler=StepPlanner(stream), num_workers=num_workers,
                         collate_fn=_OneStep(transform), **dataloader_kwargs)
        self.stream, self.transform = stream, transform
        self.next_step = stream.step  # the first step not yet handed out

    def __iter__(self) -> Iterator[Any]:
        if self.stream.step != self.next_step:
            # A previous iteration stopped with steps planned but never handed out: plan them again, as they were.
            self.stream.load_state_dict(self.stream.state_dict(next_step=self.next_step))
        for batch in super().__iter__():
            self.next_step += 1
            yield batch

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
