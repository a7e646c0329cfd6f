"""Trainer hooks: a Hugging Face `TrainerCallback` around any strategy, and a sequence view of the stream.

No monkey-patching, no global state: the callback calls `strategy.on_step()` at each optimizer-step boundary
(`on_step_end`, after gradient accumulation, so one batch is never drawn under two mixtures) and writes the
stream's and strategy's state beside each Trainer checkpoint (`dgamix_state.pt`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import IterableDataset

from .stream import MixtureStream

STATE_FILE = "dgamix_state.pt"


class SequenceDataset(IterableDataset):
    """The stream's batches as single sequences, for trainers that batch themselves (HF Trainer). Use the
    trainer's batch size equal to the stream's, so each trainer batch is exactly one planned step. `labels` equal
    `input_ids` (seq_len + 1 tokens): Hugging Face causal LMs shift them internally."""

    def __init__(self, stream: MixtureStream):
        super().__init__()
        self.stream = stream

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while self.stream.max_steps is None or self.stream.step < self.stream.max_steps:
            batch = self.stream.next_batch()
            for tokens in batch["tokens"]:
                yield {"input_ids": tokens, "labels": tokens}


def _hf_callback_base() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError as err:  # an optional extra for users
        raise ImportError("the Hugging Face hook needs `transformers` (pip install transformers accelerate)") from err
    return TrainerCallback


def make_hf_callback(stream: MixtureStream, strategy: Any) -> Any:
    """A `transformers.TrainerCallback` driving `strategy` (StaticStrategy, DGAStrategy, ...)."""

    class DGAMixCallback(_hf_callback_base()):
        def on_step_end(self, args, state, control, **kwargs):
            strategy.on_step(state.global_step - 1)
            return control

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            torch.save({"stream": stream.state_dict(), "strategy": strategy.state_dict()}, folder / STATE_FILE)
            return control

        def load(self, checkpoint: str | Path) -> None:
            """Call before `trainer.train(resume_from_checkpoint=checkpoint)`."""
            state = torch.load(Path(checkpoint) / STATE_FILE, weights_only=False)
            stream.load_state_dict(state["stream"])
            strategy.load_state_dict(state["strategy"])

    return DGAMixCallback()
