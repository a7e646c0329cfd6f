"""The mixture where users look: each mixer update logged through the trainer's own loggers, read back from the
TensorBoard event files they write (Lightning's TensorBoardLogger, the Hugging Face Trainer's report_to)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dgamix.integrations._common import TOP_BASES, update_metrics
from dgamix.mixer import DGA, Mixer, Static, UpdateRecord

from .mixer_fixtures import synthetic_store
from .test_integrations import BATCH, SEQ, VOCAB, _gpt, _HFGPT

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
STEPS, EVERY = 6, 2
UPDATES = list(range(EVERY, STEPS, EVERY))  # DGA updates after these optimizer steps (none after the last one)


@pytest.fixture
def stores(tmp_path):
    return (synthetic_store(tmp_path / "tokens", [20, 15, 10, 25], vocab=VOCAB),
            synthetic_store(tmp_path / "target", [12], seed=5, vocab=VOCAB))


def _mixer(stores) -> Mixer:
    return Mixer.from_dirs(stores[0], None, target=stores[1], seq_len=SEQ, batch_size=BATCH, seed=0,
                           strategy=DGA(eta=3.0, beta=1.0, every=EVERY, batch_size=2), max_steps=50)


def _scalars(log_dir: Path, prefix: str = "") -> dict[str, list[tuple[int, float]]]:
    """Tag -> [(step, value)] of every scalar in the TensorBoard event files under log_dir, `prefix` removed (the
    Hugging Face Trainer files its training logs under train/)."""
    found: dict[str, list[tuple[int, float]]] = {}
    for events in sorted({p.parent for p in log_dir.rglob("events.out.tfevents.*")}):
        accumulator = event_accumulator.EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            found.setdefault(tag.removeprefix(prefix), []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return found


def _check_logged(scalars: dict[str, list[tuple[int, float]]], mixer: Mixer) -> None:
    """One value per update, at its optimizer step, for each basis's weight, the distance from the start, the
    scores and the skipped flag; the last weights logged are the mixer's."""
    assert len(mixer.names) == 4
    for name, weight in zip(mixer.names, mixer.weights):
        series = scalars[f"mixer/weight/{name}"]
        assert [step for step, _ in series] == UPDATES
        assert series[-1][1] == pytest.approx(weight, rel=1e-6)  # TensorBoard keeps float32
    for tag in ("mixer/tv_from_start", "mixer/score_max", "mixer/score_min", "mixer/skipped",
                "mixer/updates_skipped", "mixer/clusters_repeating", "mixer/max_weight"):
        assert [step for step, _ in scalars[tag]] == UPDATES, tag
    uniform = np.full(4, 0.25)
    assert scalars["mixer/tv_from_start"][-1][1] == pytest.approx(0.5 * np.abs(mixer.weights - uniform).sum(),
                                                                 rel=1e-6)
    assert scalars["mixer/tv_from_start"][-1][1] > 0
    assert all(high >= low for (_, high), (_, low) in zip(scalars["mixer/score_max"], scalars["mixer/score_min"]))
    assert [value for _, value in scalars["mixer/skipped"]] == [0.0] * len(UPDATES)


# ---- Lightning ----------------------------------------------------------------------------------------------
def test_lightning_logs_each_update_to_the_trainers_tensorboard_logger(stores, tmp_path):
    lightning = pytest.importorskip("lightning")
    from dgamix.integrations.lightning import MixerCallback

    class LM(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _gpt()

        def training_step(self, batch, batch_idx):
            return self.model.loss(batch["input_ids"])

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    module = LM()
    mixer = _mixer(stores).attach(module.model)
    logger = lightning.pytorch.loggers.TensorBoardLogger(str(tmp_path / "tb"), name="run")
    trainer = lightning.Trainer(max_steps=STEPS, accelerator="cpu", logger=logger, enable_progress_bar=False,
                                enable_model_summary=False, enable_checkpointing=False,
                                callbacks=[MixerCallback(mixer)])  # log_every_n_steps (50) does not hold them back
    trainer.fit(module, mixer.loader(transform=MixerCallback.inputs))
    assert mixer.steps == STEPS
    _check_logged(_scalars(tmp_path / "tb"), mixer)


# ---- Hugging Face -------------------------------------------------------------------------------------------
def _hf_args(transformers, out: Path, report_to: list[str]):
    return transformers.TrainingArguments(output_dir=str(out), per_device_train_batch_size=BATCH, max_steps=STEPS,
                                          report_to=report_to, use_cpu=True, logging_steps=100, save_strategy="no")


def test_hf_mixer_trainer_logs_each_update_through_the_trainers_log(stores, tmp_path):
    """report_to=["tensorboard"] gets them (the Trainer writes under output_dir/runs, as train/mixer/...), and so
    does log_history."""
    transformers = pytest.importorskip("transformers")
    from dgamix.integrations.hf import MixerTrainer

    torch.manual_seed(0)
    model = _HFGPT(0.0)
    mixer = _mixer(stores).attach(model)
    trainer = MixerTrainer(model=model, args=_hf_args(transformers, tmp_path / "hf", ["tensorboard"]), mixer=mixer)
    trainer.train()
    assert mixer.steps == STEPS
    _check_logged(_scalars(tmp_path / "hf", prefix="train/"), mixer)
    history = [entry for entry in trainer.state.log_history if "mixer/tv_from_start" in entry]
    assert [entry["step"] for entry in history] == UPDATES


@pytest.mark.parametrize("through_trainer", [False, True])
def test_hf_plain_trainer_callback_logs_each_update(stores, tmp_path, through_trainer):
    """A plain Trainer with MixerCallback: log_history by itself; with `callback.trainer` set, through `trainer.log`
    to the report_to integrations as well."""
    transformers = pytest.importorskip("transformers")
    from dgamix.integrations.hf import MixerCallback

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16,
                                                                 n_layer=1, n_head=2))
    mixer = _mixer(stores).attach(model)
    callback = MixerCallback(mixer)
    trainer = transformers.Trainer(model=model, callbacks=[callback],
                                   args=_hf_args(transformers, tmp_path / "hf", ["tensorboard"]))
    loader = mixer.loader(transform=lambda b: {"input_ids": b["tokens"], "labels": b["tokens"]})
    trainer.get_train_dataloader = lambda: loader
    if through_trainer:
        callback.trainer = trainer
    trainer.train()
    history = [entry for entry in trainer.state.log_history if "mixer/tv_from_start" in entry]
    assert [entry["step"] for entry in history] == UPDATES
    assert history[-1]["mixer/weight/" + mixer.names[0]] == mixer.weights[0]
    scalars = _scalars(tmp_path / "hf", prefix="train/")
    if through_trainer:
        _check_logged(scalars, mixer)
    else:
        assert not any(tag.startswith("mixer/") for tag in scalars)


def test_update_metrics_show_the_heaviest_bases_when_there_are_many(tmp_path):
    """Over 32 bases, the 10 heaviest by name (a dashboard of hundreds of curves shows nothing)."""
    store = synthetic_store(tmp_path / "many", [3] * 40, vocab=VOCAB)
    mixer = Mixer.from_dirs(store, None, seq_len=SEQ, batch_size=BATCH, strategy=Static())
    weights = np.random.default_rng(0).dirichlet(np.ones(40))
    mixer.stream.set_weights(weights)
    metrics = update_metrics(mixer, UpdateRecord(0, weights.tolist(), [0.5, float("nan"), -1.0], False),
                             np.full(40, 1 / 40))
    shown = {tag.removeprefix("mixer/weight/") for tag in metrics if tag.startswith("mixer/weight/")}
    assert shown == {mixer.names[i] for i in np.argsort(-weights)[:TOP_BASES]}
    assert (metrics["mixer/score_max"], metrics["mixer/score_min"]) == (0.5, -1.0)  # non-finite scores left out
    assert metrics["mixer/tv_from_start"] == pytest.approx(0.5 * np.abs(weights - 1 / 40).sum())
