"""Trainer hooks: a Hugging Face `TrainerCallback` and a Lightning `Callback` around any strategy, a Hugging Face
Trainer whose data is the stream (`make_hf_trainer_class`), and a sequence view of the stream.

No monkey-patching, no global state: each callback calls `strategy.on_step()` at each optimizer-step boundary
(after gradient accumulation, so one optimizer step is never trained under two mixtures) and saves the stream's
and the strategy's state with the trainer's own checkpoints.

Both trainers fetch batches before training on them (the Hugging Face Trainer a whole optimizer step's micro-batches,
accelerate's wrapper one more; Lightning's data fetcher one ahead), so the stream has planned further than the
model has trained. The callbacks count the batches actually trained and save
`stream.state_dict(next_step=...)`: a resumed run re-plans the prefetched steps exactly as they were planned and
sees the same sequences and weights as a straight run. A weight update reaches the data one batch later than in
a plain loop (the prefetched batch was planned before the update), plus num_workers * prefetch_factor with
DataLoader workers (`loader`); that lag is part of the saved state.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset

from .loader import MixtureLoader
from .stream import MixtureStream

STATE_FILE = "dgamix_state.pt"


def hf_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A stream batch as a Hugging Face causal LM's inputs: `labels` equal `input_ids` (seq_len + 1 tokens; the
    model shifts them internally, so its n_positions must be at least seq_len + 1)."""
    return {"input_ids": batch["tokens"], "labels": batch["tokens"]}


def _refuse_observing(strategy: Any, trainer: str) -> None:
    """Strategies that learn from each batch's sequences (ODM's per-sequence losses, in-batch DGA's per-sequence
    alignments) need calls a trainer's callbacks cannot make; without them they would silently stay put."""
    if hasattr(strategy, "observe"):
        raise ValueError(f"{type(strategy).__name__} learns from every training batch (strategy.observe(...) after "
                         f"each backward), which the {trainer} does not hand to callbacks: without it the weights "
                         "would never move. Drive it from a plain training loop, or use DGAStrategy or "
                         "StaticStrategy here.")


def _check_batch_size(per_device: int | None, stream: MixtureStream, trainer: str) -> None:
    if per_device is not None and per_device != stream.batch_size:
        raise ValueError(f"the {trainer}'s per-device batch size is {per_device} but the stream plans "
                         f"{stream.batch_size} sequences per step: set them equal, so that each trainer batch is "
                         "exactly one planned step (the unit the stream saves and the weights apply to)")


class SequenceDataset(IterableDataset):
    """The stream's batches as single sequences, for trainers that batch themselves (a DataLoader with a batch
    size). Use the trainer's per-device batch size equal to the stream's, so each trainer batch is exactly one
    planned step. `labels` equal `input_ids` (seq_len + 1 tokens): Hugging Face causal LMs shift them internally.

    Under DataLoader workers each step is materialized by exactly one worker (`MixtureStream`'s split), in straight
    order; but workers iterate copies of the stream, so weights that change during training cannot reach them (an
    error says so): with changing weights and workers, use `loader.MixtureLoader`, which plans in the main process."""

    def __init__(self, stream: MixtureStream):
        super().__init__()
        self.stream = stream

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for _ in self.stream._steps_of_this_worker():
            for tokens in self.stream.next_batch()["tokens"]:
                yield {"input_ids": tokens, "labels": tokens}


class _TrainedBatches:
    """Counts the stream steps actually trained on (one per micro-batch), starting where the stream starts."""

    def __init__(self, stream: MixtureStream):
        self.stream, self.next_step = stream, stream.step

    def state(self, strategy: Any) -> dict[str, Any]:
        # Plain Python (the states' own form): torch.load(weights_only=True), which Lightning uses, reads it.
        return {"stream": self.stream.state_dict(next_step=self.next_step), "strategy": strategy.state_dict()}

    def load(self, state: dict[str, Any], strategy: Any) -> None:
        self.stream.load_state_dict(state["stream"])
        strategy.load_state_dict(state["strategy"])
        self.next_step = self.stream.step


def _hf_callback_base() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError as err:  # an optional extra for users
        raise ImportError("the Hugging Face hook needs `transformers` (pip install 'dgamix[hf]')") from err
    return TrainerCallback


def _restore_hf_rng(checkpoint: Path, args: Any) -> None:
    """Restore the RNG state the Trainer saved with `checkpoint` (its own rng_state file) just before the first
    resumed step. With `ignore_data_skip` in the middle of an epoch the Trainer does not restore it, and creating
    the DataLoader's iterator draws from torch's RNG in any case: without this, dropout would draw other masks than
    the straight run."""
    path = checkpoint / (f"rng_state_{args.process_index}.pth" if args.world_size > 1 else "rng_state.pth")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the Trainer's RNG state is missing from the checkpoint, so a resumed run "
                                "would draw other dropout masks than the straight run")
    try:
        from transformers.trainer_pt_utils import safe_globals  # numpy's RNG state under weights_only loading
    except ImportError:  # older transformers: the file is the Trainer's own, written in the user's run
        state = torch.load(path, weights_only=False)
    else:
        with safe_globals():
            state = torch.load(path, weights_only=True)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and "cuda" in state:
        if args.world_size > 1:
            torch.cuda.set_rng_state(state["cuda"])
        else:
            torch.cuda.set_rng_state_all(state["cuda"])


def make_hf_trainer_class(stream: MixtureStream, base: type | None = None) -> type:
    """A subclass of `base` (default `transformers.Trainer`) whose training data is the stream, planned in the main
    process and read by `args.dataloader_num_workers` workers (`loader.MixtureLoader`): weight updates reach the
    data whatever the number of workers. No `train_dataset` is needed. The mixer's own state places the data on
    resume, so the Trainer's skipping of already-seen batches is turned off (`ignore_data_skip`)."""
    if base is None:
        _hf_callback_base()  # the clear ImportError when transformers is missing
        from transformers import Trainer as base

    class MixtureTrainer(base):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            _check_batch_size(self.args.per_device_train_batch_size, stream, "Hugging Face Trainer")
            if self.args.max_steps is None or self.args.max_steps <= 0:
                raise ValueError(f"TrainingArguments.max_steps = {self.args.max_steps}: the stream has no epochs "
                                 "(its length changes with every resume), so the Trainer must count optimizer "
                                 "steps: set max_steps > 0")
            self.args.ignore_data_skip = True

        def get_train_dataloader(self) -> Any:
            workers = self.args.dataloader_num_workers
            extra = {"prefetch_factor": self.args.dataloader_prefetch_factor} if workers else {}
            return MixtureLoader(stream, num_workers=workers, transform=hf_inputs,
                                 pin_memory=self.args.dataloader_pin_memory, **extra).dataloader

    return MixtureTrainer


def make_hf_callback(stream: MixtureStream, strategy: Any) -> Any:
    """A `transformers.TrainerCallback` driving `strategy` (StaticStrategy or DGAStrategy). The Trainer's
    per-device batch size must equal the stream's batch size (checked when training begins)."""
    _refuse_observing(strategy, "Hugging Face Trainer")

    class DGAMixCallback(_hf_callback_base()):
        def __init__(self) -> None:
            self.trained = _TrainedBatches(stream)
            self.rng_from: Path | None = None  # the checkpoint whose RNG state the next step starts from

        def on_step_begin(self, args, state, control, **kwargs):
            if self.rng_from is not None:
                _restore_hf_rng(self.rng_from, args)
                self.rng_from = None
            return control

        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            _check_batch_size(args.per_device_train_batch_size, stream, "Hugging Face Trainer")
            dataset = getattr(train_dataloader, "dataset", None)
            dataset = getattr(dataset, "dataset", dataset)  # accelerate's IterableDatasetShard under DDP
            if args.dataloader_num_workers and isinstance(dataset, SequenceDataset):
                # Refuse now, not at the first checkpoint (the workers' copies hold the stream's position).
                raise ValueError(f"dataloader_num_workers = {args.dataloader_num_workers} over SequenceDataset: the "
                                 "workers iterate copies of the stream, which can neither take weight changes nor be "
                                 "saved; use make_hf_trainer_class(stream) (the stream planned in the main process, "
                                 "read by any number of workers)")
            return control

        def on_substep_end(self, args, state, control, **kwargs):  # a micro-batch of gradient accumulation
            self.trained.next_step += 1
            return control

        def on_step_end(self, args, state, control, **kwargs):
            self.trained.next_step += 1
            strategy.on_step(state.global_step - 1)
            return control

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(self.trained.state(strategy), folder / STATE_FILE)
            return control

        def load(self, checkpoint: str | Path) -> None:
            """Call before `trainer.train(resume_from_checkpoint=checkpoint)`. Also restores, at the first step, the
            RNG state the Trainer saved there (it skips that when `ignore_data_skip` is set)."""
            self.trained.load(torch.load(Path(checkpoint) / STATE_FILE, weights_only=True), strategy)
            self.rng_from = Path(checkpoint)

    return DGAMixCallback()


def _lightning_callback_base() -> type:
    try:
        from lightning.pytorch.callbacks import Callback
    except ImportError:
        try:
            from pytorch_lightning.callbacks import Callback
        except ImportError as err:  # an optional extra for users
            raise ImportError("the Lightning hook needs `lightning` (pip install 'dgamix[lightning]')") from err
    return Callback


def make_lightning_callback(stream: MixtureStream, strategy: Any) -> Any:
    """A Lightning `Callback` driving `strategy`. Its state (stream + strategy) is saved inside Lightning's own
    checkpoints and restored by `trainer.fit(..., ckpt_path=...)`; nothing else to call. Feed the model one
    planned step per batch: `MixtureLoader(stream, num_workers=...).dataloader` (any number of workers)."""
    _refuse_observing(strategy, "Lightning Trainer")

    class DGAMixLightningCallback(_lightning_callback_base()):
        def __init__(self) -> None:
            self.trained = _TrainedBatches(stream)
            self.optimizer_steps = None

        @property
        def state_key(self) -> str:
            return "dgamix"

        def on_train_start(self, trainer, pl_module) -> None:
            self.optimizer_steps = trainer.global_step
            loader = trainer.train_dataloader
            _check_batch_size(getattr(loader, "batch_size", None), stream, "Lightning DataLoader")
            if getattr(loader, "num_workers", 0) and isinstance(getattr(loader, "dataset", None), SequenceDataset):
                raise ValueError(f"a DataLoader with num_workers = {loader.num_workers} over SequenceDataset: the "
                                 "workers iterate copies of the stream, which can neither take weight changes nor be "
                                 "saved; pass MixtureLoader(stream, num_workers=...).dataloader instead")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.trained.next_step += 1
            if trainer.global_step != self.optimizer_steps:  # an optimizer step ended with this micro-batch
                self.optimizer_steps = trainer.global_step
                strategy.on_step(trainer.global_step - 1)

        def state_dict(self) -> dict[str, Any]:
            return self.trained.state(strategy)

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            self.trained.load(state_dict, strategy)

    return DGAMixLightningCallback()
