"""Batches planned by the process that owns the weights, read by any number of DataLoader workers.

A step has a cheap, stateful half (which clusters, which stream positions: `MixtureStream.plan_step`) and an
expensive, stateless half (reading the tokens from the memory-mapped store: `MixtureStream.read`). This module
splits them across processes:

- `StepPlanner`, a batch sampler, plans this rank's slice of each step in the main process, with the weights in
  force: a strategy's `set_weights()` reaches the next step it plans, whatever the number of workers.
- `TokenReader`, a map-style dataset with no state of its own, reads a planned step in a worker.
- `MixtureLoader` puts them in a `torch.utils.data.DataLoader` and owns the one state to save.

Prefetching: with W workers and prefetch factor F the DataLoader plans up to W * F steps ahead of the step being
trained (1 in-process), so a weight change reaches training that many steps after it is made. The lag is part of
the saved state: `MixtureLoader.state_dict()` records the first step not yet handed to the trainer and the weights
the steps planned after it were planned with, and a resumed run re-plans them exactly (`MixtureStream.state_dict`).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from torch.utils.data import DataLoader, Dataset, Sampler

from .stream import SNAPSHOTS_KEPT, MixtureStream, PlannedStep


class StepPlanner(Sampler):
    """Yields `[PlannedStep]` per step (a batch of one plan), planned in the process iterating it."""

    def __init__(self, stream: MixtureStream):
        self.stream = stream

    def __iter__(self) -> Iterator[list[PlannedStep]]:
        while self.stream.max_steps is None or self.stream.step < self.stream.max_steps:
            yield [self.stream.plan_step()]

    def __len__(self) -> int:
        if self.stream.max_steps is None:
            raise TypeError("an endless stream has no length (set stream.max_steps for one)")
        return max(0, self.stream.max_steps - self.stream.step)


class TokenReader(Dataset):
    """Reads a planned step's tokens; holds nothing that changes during training, so workers' copies are exact."""

    def __init__(self, stream: MixtureStream):
        self.stream = stream

    def __getitem__(self, planned: PlannedStep) -> dict[str, Any]:
        return self.stream.read(planned)


def _the_batch(items: list[dict[str, Any]]) -> dict[str, Any]:
    return items[0]  # each "batch" of the planner is one planned step, already a batch


class MixtureLoader:
    """The stream's batches through a DataLoader with `num_workers` workers, planned in this process.

    Iterate it like a DataLoader (each item is `MixtureStream.next_batch()`'s dict, or `transform(dict)`), change
    the weights at any time (they apply from the next step planned), and save `state_dict()`: it resumes exactly,
    prefetched steps included. `dataloader` is the underlying DataLoader, for trainers that insist on one (Lightning);
    their callbacks then count the trained steps (`hooks`). Other keyword arguments go to the DataLoader."""

    def __init__(self, stream: MixtureStream, num_workers: int = 0,
                 transform: Callable[[dict[str, Any]], Any] | None = None, **dataloader_kwargs: Any):
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers = {num_workers!r}: expected a non-negative integer")
        ahead = num_workers * (dataloader_kwargs.get("prefetch_factor") or 2) + 1
        if ahead > SNAPSHOTS_KEPT:
            raise ValueError(f"num_workers = {num_workers} with prefetch_factor "
                             f"{dataloader_kwargs.get('prefetch_factor') or 2} plans {ahead} steps ahead; the stream "
                             f"can save a position at most {SNAPSHOTS_KEPT} steps behind its planning")
        self.stream, self.transform = stream, transform
        collate = _the_batch if transform is None else (lambda items: transform(items[0]))
        self.dataloader = DataLoader(TokenReader(stream), batch_sampler=StepPlanner(stream), num_workers=num_workers,
                                     collate_fn=collate, **dataloader_kwargs)
        self.next_step = stream.step  # the first step not yet handed out

    def __iter__(self) -> Iterator[Any]:
        if self.stream.step != self.next_step:
            # A previous iteration stopped with steps planned but never handed out: plan them again, as they were.
            self.stream.load_state_dict(self.stream.state_dict(next_step=self.next_step))
        for batch in self.dataloader:
            self.next_step += 1
            yield batch

    def __len__(self) -> int:
        if self.stream.max_steps is None:
            raise TypeError("an endless stream has no length (set stream.max_steps for one)")
        return max(0, self.stream.max_steps - self.next_step)

    def state_dict(self) -> dict[str, Any]:
        """The stream's state after the last step handed out (the steps planned beyond it are re-planned on
        resume with the weights they were planned with)."""
        return self.stream.state_dict(next_step=self.next_step)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
        self.next_step = self.stream.step
