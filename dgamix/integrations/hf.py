"""The mixer in the Hugging Face `Trainer`: `MixerTrainer`, and `MixerCallback` for a Trainer of your own.

    trainer = MixerTrainer(model=model, args=TrainingArguments(..., per_device_train_batch_size=16, max_steps=N),
                           mixer=mixer)
    trainer.train(resume_from_checkpoint=...)      # the mixer's state is restored with the Trainer's

`MixerTrainer` feeds the model from the mixer (planned in the main process, read by `dataloader_num_workers`
workers: weight updates reach the data whatever their number), runs each micro-batch's forward and backward in the
strategy's context and hands the batch to `mixer.observe` after each backward, with each sequence's weight in the
loss under gradient accumulation; so every strategy works, in-batch DGA and ODM included. The mixer steps at each
optimizer step (after gradient accumulation, so one optimizer step is never trained under two mixtures), except
after the Trainer's last one (`max_steps`: its update would never be trained on), and its state is saved in every
checkpoint (`dgamix_state.pt`) and restored by `train(resume_from_checkpoint=...)`.

Each weight update is logged under `mixer/` (the weights, their distance from the starting weights, the update's
scores, skipped updates) through the Trainer's `log`, so every `report_to` integration (TensorBoard, W&B, ...) and
`trainer.state.log_history` get them at the optimizer step of the update.

Every sequence of the stream has the same length and no padding, so a micro-batch's loss weighs each of its n
sequences 1 / n, and 1 / (n * A) under gradient accumulation over A micro-batches, whether the Trainer divides by
A or by the number of label tokens.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    import transformers
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint
except ImportError as err:  # an optional extra
    raise ImportError("dgamix.integrations.hf needs `transformers` and `accelerate`: pip install 'dgamix[hf]'") from err

from ..mixer import Mixer
from ..mixer.loader import MixtureLoader
from ._common import (STATE_FILE, ModelInputs, TrainedSteps, check_batch_size, check_in_step, check_model_fits,
                      set_total_steps, split_batch, update_metrics)

__all__ = ["MixerCallback", "MixerTrainer", "STATE_FILE"]


def _restore_rng(checkpoint: Path, args: Any) -> None:
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


# The model receives all seq_len + 1 tokens of each sequence as input_ids (and as labels: it shifts them itself).
_FED = "input_ids = labels: seq_len + 1 tokens, which the model shifts itself"


class MixerCallback(TrainerCallback):
    """Steps the mixer at each optimizer step and saves its state with each checkpoint. On its own (a Trainer that
    is not a `MixerTrainer`) it drives the strategies that learn nothing from the training step (static, exact
    DGA, DoGE) and restores the mixer when the Trainer resumes from `<output_dir>/checkpoint-<step>`.

    Each weight update's metrics (`mixer/...`) go through `trainer.log` when `trainer` is set (`MixerTrainer` sets
    it; with a plain Trainer, set `callback.trainer = trainer`), so that the Trainer's `report_to` integrations get
    them; otherwise they are appended to the Trainer's `state.log_history` alone."""

    def __init__(self, mixer: Mixer, observed: bool = False):
        if not observed and mixer.needs & {"backward_hooks", "sequence_losses"}:
            raise ValueError(f"{type(mixer.settings).__name__} learns from every training batch (mixer.observe after "
                             "each backward, with the batch), and a plain Trainer never hands the batch to its "
                             "callbacks: use dgamix.integrations.hf.MixerTrainer(..., mixer=mixer)")
        self.mixer = mixer
        self.trained = TrainedSteps(mixer)
        self.trainer: Trainer | None = None
        self.rng_from: Path | None = None  # the checkpoint whose RNG state the next step starts from
        self._initial_weights = mixer.weights

    def load(self, checkpoint: str | Path) -> None:
        """Restore the mixer from `checkpoint` (a Trainer checkpoint folder), and at the first resumed step the RNG
        state the Trainer saved there (it skips that when `ignore_data_skip` is set)."""
        path = Path(checkpoint) / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no mixer state in this checkpoint (was it saved with a MixerCallback?)")
        self.trained.load(torch.load(path, weights_only=True))
        self.rng_from = Path(checkpoint)

    def on_init_end(self, args, state, control, **kwargs):
        # The mixer's state places the data on resume: the Trainer's skipping of the batches it has seen would skip
        # that many more steps of the restored stream.
        args.ignore_data_skip = True
        return control

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        check_batch_size(args.per_device_train_batch_size, self.mixer, "Hugging Face Trainer")
        if model is not None:
            check_model_fits(model, self.mixer, self.mixer.stream.seq_len + 1, "Hugging Face Trainer", _FED)
        set_total_steps(self.mixer, state.max_steps or args.max_steps)  # the state's, where the Trainer set it
        if state.global_step and self.mixer.steps != state.global_step:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if (folder / STATE_FILE).is_file():
                self.load(folder)
        check_in_step(self.mixer, state.global_step, "Hugging Face Trainer")
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        if self.rng_from is not None:
            _restore_rng(self.rng_from, args)
            self.rng_from = None
        return control

    def on_substep_end(self, args, state, control, **kwargs):  # a micro-batch of gradient accumulation
        self.trained.next_step += 1
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self.trained.next_step += 1
        check_in_step(self.mixer, state.global_step - 1, "Hugging Face Trainer")
        record = self.mixer.step()
        if record is not None:
            metrics = update_metrics(self.mixer, record, self._initial_weights)
            if self.trainer is not None:
                self.trainer.log(metrics)  # log_history and every report_to integration, at state.global_step
            else:
                state.log_history.append({**metrics, "step": state.global_step})
        return control

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.trained.state(), folder / STATE_FILE)
        return control


class MixerTrainer(Trainer):
    """A `transformers.Trainer` whose training data is the mixer's stream (no `train_dataset`), for every strategy.
    `mixer`: the `dgamix.mixer.Mixer`, attached to the model when its strategy scores with it. The Trainer must
    count optimizer steps (`max_steps` > 0: the stream has no epochs) with a per-device batch size equal to the
    mixer's. The mixer's own state places the data on resume, so the Trainer's skipping of seen batches is off."""

    def __init__(self, *args: Any, mixer: Mixer, **kwargs: Any) -> None:
        self.mixer = mixer
        self.mixer_callback = MixerCallback(mixer, observed=True)
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), self.mixer_callback]
        super().__init__(*args, **kwargs)
        self.mixer_callback.trainer = self
        check_batch_size(self.args.per_device_train_batch_size, mixer, "Hugging Face Trainer")
        check_model_fits(self.model, mixer, mixer.stream.seq_len + 1, "Hugging Face Trainer", _FED)
        if self.args.max_steps is None or self.args.max_steps <= 0:
            raise ValueError(f"TrainingArguments.max_steps = {self.args.max_steps}: the stream has no epochs (its "
                             "length changes with every resume), so the Trainer must count optimizer steps: set "
                             "max_steps > 0")
        self.args.ignore_data_skip = True
        self._sequence_losses: torch.Tensor | None = None

    def get_train_dataloader(self) -> MixtureLoader:
        workers = self.args.dataloader_num_workers
        extra = {"prefetch_factor": self.args.dataloader_prefetch_factor} if workers else {}
        return self.mixer.loader(num_workers=workers, transform=ModelInputs(labels=True),
                                 pin_memory=self.args.dataloader_pin_memory, **extra)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`; with `resume_from_checkpoint` (a folder, or True for the last one in output_dir) the
        mixer is restored from the same checkpoint."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint to resume from in {self.args.output_dir}")
        if resume_from_checkpoint:
            self.mixer_callback.load(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        inputs, fields = split_batch(inputs)
        self._sequence_losses = None
        with self.mixer.training_step():
            loss = super().training_step(model, inputs, num_items_in_batch)
        n = len(fields["cluster"])
        self.mixer.observe(fields, sequence_losses=self._sequence_losses,
                           loss_scale=1.0 / (n * self.current_gradient_accumulation_steps),
                           grad_scaler=getattr(self.accelerator, "scaler", None))  # fp16: its scale divided out
        return loss

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if "sequence_losses" not in self.mixer.needs or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        # Per-sequence losses for the strategy (ODM), from the logits; the loss backpropagated is their mean, scaled
        # as the Trainer scales its own: by the label tokens of the whole accumulated (and, across devices,
        # gathered) batch when it counted them, else a mean that training_step divides by the accumulation.
        labels = inputs["labels"]
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        logits = outputs["logits"][:, :-1].float()  # a ModelOutput or a plain dict
        per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                      labels[:, 1:].reshape(-1), reduction="none")
        per_token = per_token.view(labels.shape[0], -1)
        self._sequence_losses = per_token.detach().mean(dim=1)
        if self._loss_is_scaled_for_accumulation(num_items_in_batch):
            loss = per_token.sum() / num_items_in_batch  # the Trainer then does not divide by the accumulation
            if self.args.average_tokens_across_devices:  # num_items_in_batch counts every device's tokens
                loss = loss * self.accelerator.num_processes
        else:
            loss = per_token.mean()
        return (loss, outputs) if return_outputs else loss


    def _loss_is_scaled_for_accumulation(self, num_items_in_batch: Any) -> bool:
        """The Trainer's own rule (training_step): whether the loss is already divided for gradient accumulation."""
        fixed = getattr(self, "loss_is_scaled_for_ga", None)
        if fixed is not None:
            return bool(fixed) and num_items_in_batch is not None
        return bool(self.model_accepts_loss_kwargs) and num_items_in_batch is not None


_ = transformers  # imported for the clear error above; the names come from it
