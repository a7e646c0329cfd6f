"""The mixer in Lightning: `MixerCallback`, for every strategy.

    trainer = lightning.Trainer(max_steps=N, callbacks=[MixerCallback(mixer)], accumulate_grad_batches=A)
    trainer.fit(module, mixer.loader(num_workers=2, transform=MixerCallback.inputs), ckpt_path=...)

The callback runs each micro-batch's forward and backward in the strategy's context, hands the batch to
`mixer.observe` after its backward (`on_after_backward`) with each sequence's weight in the loss under gradient
accumulation, steps the mixer at each optimizer step (the strategy does not update after the last one, the
Trainer's `max_steps`: nothing would train on it), and keeps the mixer's state inside Lightning's own
checkpoints (restored by `trainer.fit(..., ckpt_path=...)`, nothing else to call) together with the global RNG
states (python, numpy, torch, CUDA), which Lightning does not save, so that a model with dropout resumes exactly.
ODM needs each sequence's loss: return `{"loss": loss, "sequence_losses": losses}` from `training_step`. Use the
batch's `input_ids` (and ignore `cluster` and `prob`, the mixer's fields). Each weight update is logged to the
Trainer's loggers under `mixer/` (weights, distance from the starting weights, scores, skipped updates).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as err:  # an optional extra
        raise ImportError("dgamix.integrations.lightning needs `lightning`: pip install 'dgamix[lightning]'") from err

from ..mixer import Mixer
from ..mixer.distributed import is_distributed, rank_and_world_size
from ..mixer.mixer import rng_state, set_rng_state
from ._common import (ModelInputs, TrainedSteps, check_batch_size, check_in_step, check_model_fits, set_total_steps,
                      update_metrics)

__all__ = ["MixerCallback"]


class MixerCallback(Callback):
    """Drives `mixer` from a Lightning Trainer (every strategy) and keeps its state, with the RNG states, in
    Lightning's checkpoints. Feed the Trainer `mixer.loader(..., transform=MixerCallback.inputs)`."""

    # The loader's transform for a LightningModule: `input_ids` plus the mixer's fields (no labels). An instance of
    # a module-level class, not a lambda, so that DataLoader workers started by spawn or forkserver unpickle it.
    inputs = ModelInputs(labels=False)

    def __init__(self, mixer: Mixer):
        self.mixer = mixer
        self.trained = TrainedSteps(mixer)
        self.optimizer_steps: int | None = None
        self._step_context = contextlib.ExitStack()
        self._batch: Any = None
        self._observed = False
        self._initial_weights = mixer.weights
        self._rng_to_restore: dict[str, Any] | None = None  # from a checkpoint: restored at the first resumed batch

    @property
    def state_key(self) -> str:
        return "dgamix"

    def on_train_start(self, trainer, pl_module) -> None:
        self.optimizer_steps = trainer.global_step
        check_in_step(self.mixer, trainer.global_step, "Lightning Trainer")
        set_total_steps(self.mixer, trainer.max_steps)
        # A transformers model inside the module: the module shifts the seq_len + 1 tokens it gets, so it feeds at
        # least seq_len positions (seq_len + 1 when it passes all of input_ids and lets the model shift the labels).
        for model in (pl_module, *pl_module.children()):
            check_model_fits(model, self.mixer, self.mixer.stream.seq_len, "LightningModule",
                             "input_ids holds seq_len + 1 tokens, shifted to seq_len inputs")
        loader = trainer.train_dataloader
        planned_by = getattr(getattr(loader, "batch_sampler", None), "stream", None)
        if planned_by is not None and planned_by is not self.mixer.stream:
            raise ValueError("the Lightning DataLoader draws from another mixer's stream: pass this mixer's "
                             "mixer.loader(...)")
        if planned_by is None:  # a DataLoader of the user's own
            check_batch_size(getattr(loader, "batch_size", None), self.mixer, "Lightning DataLoader")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._rng_to_restore is not None:
            # Here, not when the checkpoint is loaded: between the two, Lightning starts the DataLoader and the
            # fit loop, which may draw from the global RNG; the uninterrupted run drew nothing between its
            # checkpoint and this point.
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        self._batch, self._observed = batch, False
        self._step_context.close()  # a batch skipped before its backward left its context open
        self._step_context.enter_context(self.mixer.training_step())

    def on_after_backward(self, trainer, pl_module) -> None:
        self._step_context.close()
        if "sequence_losses" not in self.mixer.needs:  # observed now, while the hooks hold this backward
            self._observe(trainer, None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._step_context.close()
        if outputs is None:  # training_step skipped this batch: no backward, nothing to observe
            self._observed = True
        if not self._observed:
            losses = outputs.get("sequence_losses") if isinstance(outputs, dict) else None
            if losses is None and "sequence_losses" in self.mixer.needs:
                raise ValueError(f"{type(self.mixer.settings).__name__} learns from each sequence's training loss: "
                                 "return {'loss': loss, 'sequence_losses': <(n,) losses>} from training_step")
            self._observe(trainer, losses)
        self.trained.next_step += 1
        if trainer.global_step != self.optimizer_steps:  # an optimizer step ended with this micro-batch
            self.optimizer_steps = trainer.global_step
            check_in_step(self.mixer, trainer.global_step - 1, "Lightning Trainer")
            record = self.mixer.step()
            if record is not None:
                self._log(trainer, update_metrics(self.mixer, record, self._initial_weights))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._step_context.close()  # in-batch DGA's hooks must not stay paused

    def _observe(self, trainer, sequence_losses: Any) -> None:
        n = len(self._batch["cluster"])
        self.mixer.observe(self._batch, sequence_losses=sequence_losses,
                           loss_scale=1.0 / (n * trainer.accumulate_grad_batches),
                           grad_scaler=getattr(trainer.precision_plugin, "scaler", None))  # fp16: divided out
        self._observed = True

    @staticmethod
    def _log(trainer, metrics: dict[str, float]) -> None:
        # Straight to the loggers at this optimizer step: LightningModule.log would keep only the values of steps
        # that fall on `log_every_n_steps`, and mixer updates are rare.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        # Lightning builds the checkpoint on every rank and writes rank 0's: gather each rank's RNG states (its own
        # dropout masks) so that each restores its own.
        rng: list[Any] = [rng_state()]
        if is_distributed():
            rng = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(rng, rng_state())
        return {"mixer": self.trained.state(), "rng": rng}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "mixer" not in state_dict:  # a checkpoint from before the RNG states were saved: the mixer's state alone
            self.trained.load(state_dict)
            return
        self.trained.load(state_dict["mixer"])
        rank, world_size = rank_and_world_size()
        rng = state_dict["rng"]
        if len(rng) != world_size:
            raise ValueError(f"the checkpoint holds the RNG states of {len(rng)} ranks: resume with as many ranks, "
                             "so that each draws the dropout masks of the run it continues")
        self._rng_to_restore = rng[rank]
