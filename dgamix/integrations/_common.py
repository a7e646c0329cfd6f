"""What both integrations share: counting the stream steps a trainer actually trained on, the checks, and the
metrics each mixer update logs to the trainer's loggers."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..mixer import Mixer
from ..mixer.strategies import UpdateRecord

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


def check_model_fits(model: torch.nn.Module, mixer: Mixer, positions: int, trainer: str, fed: str) -> None:
    """A model sized for other data fails deep in its embedding with torch's bare "index out of range in self":
    check, before the first step, that its vocabulary holds every token id of the store and that its position
    embeddings reach the `positions` tokens the trainer feeds it (`fed` says what they are). Reads what a
    transformers model declares (its input embedding's rows, else `config.vocab_size`; `config.n_positions` or
    `config.max_position_embeddings`); a model that declares neither is not checked."""
    config = getattr(model, "config", None)
    embeddings = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    vocab = getattr(embeddings, "num_embeddings", None) or getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and vocab < mixer.vocab_size:
        raise ValueError(f"the model's vocabulary has {vocab} token ids but the mixer's token store has "
                         f"{mixer.vocab_size} (its vocab_size): build the model with vocab_size >= {mixer.vocab_size} "
                         "(e.g. its config's vocab_size=mixer.vocab_size), or it fails on the first token id beyond "
                         "its embedding")
    for name in ("n_positions", "max_position_embeddings"):
        limit = getattr(config, name, None)
        if isinstance(limit, int):
            if limit < positions:
                raise ValueError(f"the model takes at most {limit} positions (config.{name}) but the {trainer} feeds "
                                 f"it {positions} tokens per sequence ({fed}; the mixer's seq_len is "
                                 f"{mixer.stream.seq_len}): set {name} >= {positions}, or build the Mixer with "
                                 f"seq_len <= {limit - (positions - mixer.stream.seq_len)}")
            break


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


# At most this many bases are logged one by one; beyond it, the TOP_BASES heaviest (a dashboard of hundreds of curves
# shows nothing, and each logger call pays per value).
ALL_BASES_UP_TO, TOP_BASES = 32, 10


def update_metrics(mixer: Mixer, record: UpdateRecord, initial: np.ndarray) -> dict[str, float]:
    """What a trainer's loggers show of one mixer update, under `mixer/`: the weights in force from the next step
    (every basis by name up to ALL_BASES_UP_TO bases, else the TOP_BASES heaviest), their total variation distance
    from the starting weights (the anchored rules' anchor, which their state keeps across resumes, else `initial`:
    the weights when the integration was built), the largest and smallest finite score, whether the update was
    skipped (non-finite or missing scores) and the strategy's count of skipped updates, and how many clusters the
    stream has begun to repeat (token-limited data)."""
    weights, names = mixer.weights, mixer.names
    prior = getattr(mixer.strategy, "prior", None)
    start = np.asarray(initial if prior is None else prior, dtype=np.float64)
    heaviest = np.argsort(-weights, kind="stable")
    shown = heaviest if len(weights) <= ALL_BASES_UP_TO else heaviest[:TOP_BASES]
    metrics = {f"mixer/weight/{names[i]}": float(weights[i]) for i in shown}
    metrics["mixer/tv_from_start"] = 0.5 * float(np.abs(weights - start).sum())
    metrics["mixer/max_weight"] = float(weights.max())
    scores = np.asarray(record.scores, dtype=np.float64)
    finite = scores[np.isfinite(scores)]
    if finite.size:
        metrics["mixer/score_max"], metrics["mixer/score_min"] = float(finite.max()), float(finite.min())
    metrics["mixer/skipped"] = float(record.skipped)
    skipped = getattr(mixer.strategy, "skipped", None)
    if isinstance(skipped, (int, np.integer)):
        metrics["mixer/updates_skipped"] = float(skipped)
    metrics["mixer/clusters_repeating"] = float((mixer.stream.passes_completed() >= 1).sum())
    return metrics
