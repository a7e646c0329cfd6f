"""Trainer hooks: a Hugging Face `TrainerCallback` and a Lightning `Callback` around any strategy, and a sequence
view of the stream.

No monkey-patching, no global state: each callback calls `strategy.on_step()` at each optimizer-step boundary
(after gradient accumulation, so one optimizer step is never trained under two mixtures) and saves the stream's
and the strategy's state with the trainer's own checkpoints.

Both trainers prefetch a batch ahead (accelerate to detect the end of the data, Lightning's data fetcher), so the
stream has planned further than the model has trained. The callbacks count the batches actually trained and save
`stream.state_dict(next_step=...)`: a resumed run re-plans the prefetched steps exactly as they were planned and
sees the same sequences and weights as a straight run. A weight update reaches the data one batch later than in
a plain loop (the prefetched batch was planned before the update); that lag is part of the saved state.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset

from .stream import MixtureStream

STATE_FILE = "dgamix_state.pt"


class SequenceDataset(IterableDataset):
    """The stream's batches as single sequences, for trainers that batch themselves (HF Trainer, a DataLoader with
    a batch size). Use the trainer's per-device batch size equal to the stream's, so each trainer batch is exactly
    one planned step. `labels` equal `input_ids` (seq_len + 1 tokens): Hugging Face causal LMs shift them
    internally."""

    def __init__(self, stream: MixtureStream):
        super().__init__()
        self.stream = stream

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while self.stream.max_steps is None or self.stream.step < self.stream.max_steps:
            batch = self.stream.next_batch()
            for tokens in batch["tokens"]:
                yield {"input_ids": tokens, "labels": tokens}


def _tensors(value: Any) -> Any:
    """numpy arrays -> torch tensors, recursively: checkpoints then load with torch.load(weights_only=True), which
    Lightning uses and which never runs code from the file."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, dict):
        return {k: _tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tensors(v) for v in value]
    return value


class _TrainedBatches:
    """Counts the stream steps actually trained on (one per micro-batch), starting where the stream starts."""

    def __init__(self, stream: MixtureStream):
        self.stream, self.next_step = stream, stream.step

    def state(self, strategy: Any) -> dict[str, Any]:
        return _tensors({"stream": self.stream.state_dict(next_step=self.next_step),
                         "strategy": strategy.state_dict()})

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


def make_hf_callback(stream: MixtureStream, strategy: Any) -> Any:
    """A `transformers.TrainerCallback` driving `strategy` (StaticStrategy, DGAStrategy, ...). The Trainer's
    per-device batch size must equal the stream's batch size."""

    class DGAMixCallback(_hf_callback_base()):
        def __init__(self) -> None:
            self.trained = _TrainedBatches(stream)

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
            """Call before `trainer.train(resume_from_checkpoint=checkpoint)`."""
            self.trained.load(torch.load(Path(checkpoint) / STATE_FILE, weights_only=True), strategy)

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
    planned step per batch: `DataLoader(SequenceDataset(stream), batch_size=stream.batch_size)`."""

    class DGAMixLightningCallback(_lightning_callback_base()):
        def __init__(self) -> None:
            self.trained = _TrainedBatches(stream)
            self.optimizer_steps = None

        @property
        def state_key(self) -> str:
            return "dgamix"

        def on_train_start(self, trainer, pl_module) -> None:
            self.optimizer_steps = trainer.global_step

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
