"""What both integrations share: counting the stream steps a trainer actually trained on, and the checks."""
from __future__ import annotations

from typing import Any

from ..mixer import Mixer

STATE_FILE = "dgamix_state.pt"
# Batch fields the mixer's strategies read after the backward; the model never sees them.
MIXER_FIELDS = ("cluster", "prob")


class TrainedSteps:
    """Trainers fetch batches before training on them (the Hugging Face Trainer a whole optimizer step's
    micro-batches, accelerate's wrapper one more; Lightning's fetcher one ahead), so the stream has planned further
    than the model has trained. This counts the stream steps trained (one per micro-batch), so that the saved state
    re-plans the prefetched steps exactly as they were planned."""

    def __init__(self, mixer: Mixer):
        self.mixer, self.next_step = mixer, mixer.stream.step

    def state(self) -> dict[str, Any]:
        # Plain Python (the states' own form): torch.load(weights_only=True), which Lightning uses, reads it.
        return self.mixer.state_dict(next_step=self.next_step)

    def load(self, state: dict[str, Any]) -> None:
        self.mixer.load_state_dict(state)
        self.next_step = self.mixer.stream.step


def check_batch_size(per_device: int | None, mixer: Mixer, trainer: str) -> None:
    if per_device is not None and per_device != mixer.stream.batch_size:
        raise ValueError(f"the {trainer}'s per-device batch size is {per_device} but the mixer plans "
                         f"{mixer.stream.batch_size} sequences per step: set them equal, so that each trainer batch is "
                         "exactly one planned step (the unit the mixer saves and the weights apply to)")


def check_in_step(mixer: Mixer, optimizer_steps: int, trainer: str) -> None:
    """The mixer counts the optimizer steps itself; a trainer that is further on was resumed without the mixer's
    state, and would silently restart the data at step 0 under the initial weights."""
    if mixer.steps != optimizer_steps:
        raise RuntimeError(f"the {trainer} is at optimizer step {optimizer_steps} but the mixer at step {mixer.steps}: "
                           "the run was resumed without the mixer's state (it is saved in each checkpoint as "
                           f"{STATE_FILE}): resume with MixerTrainer.train(resume_from_checkpoint=...), or with a "
                           "plain Trainer call MixerCallback.load(checkpoint) first")


def set_total_steps(mixer: Mixer, max_steps: int | None) -> None:
    """Tell the mixer the trainer's optimizer steps (its `max_steps`; -1 or None: not bounded by steps), so that the
    strategy skips the update after the last one, which no step would train on. The mixer's own stream bound counts
    stream steps (micro-batches under gradient accumulation), not optimizer steps."""
    if max_steps is not None and max_steps > 0:
        mixer.total_steps = int(max_steps)


def split_batch(batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the model's inputs, the mixer's fields) of a batch made by `model_inputs`."""
    inputs = {k: v for k, v in batch.items() if k not in MIXER_FIELDS}
    return inputs, {k: batch[k] for k in MIXER_FIELDS if k in batch}


class ModelInputs:
    """A stream batch as a causal LM's inputs (`input_ids`; with `labels`, equal to them, for models that shift them
    internally, which then need n_positions >= seq_len + 1) plus the mixer's fields (`cluster`, `prob`). A class,
    not a lambda, so DataLoader workers started by spawn can unpickle it."""

    def __init__(self, labels: bool = True):
        self.labels = labels

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = {"input_ids": batch["tokens"], **{k: batch[k] for k in MIXER_FIELDS}}
        if self.labels:
            out["labels"] = batch["tokens"]
        return out
