"""The Hugging Face and Lightning integrations on tiny models (random init, no download), CPU: every strategy runs
through each of them (in-batch DGA and ODM included, with DataLoader workers and gradient accumulation), and a run
resumed from the trainer's own checkpoint trains on the same sequences and ends with the same weights, bit for bit,
as a straight run, although both trainers prefetch ahead."""
from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import torch

from dgamix.mixer import DGA, ODM, InBatchDGA, Mixer, Static
from dgamix.trainer.model import GPT, GPTConfig

from .mixer_fixtures import synthetic_store

STEPS, BATCH, SEQ, VOCAB = 8, 4, 8, 128
SETTINGS = {"dga": DGA(eta=3.0, beta=1.0, every=2, batch_size=2),
            "inbatch": InBatchDGA(eta=0.5, every=1, refresh=3, target_batch_size=4, decay=0.9, min_sequences=2),
            "odm": ODM(), "static": Static()}


def _digest(tokens: torch.Tensor) -> str:
    return hashlib.blake2b(tokens.cpu().numpy().tobytes(), digest_size=8).hexdigest()


@pytest.fixture
def stores(tmp_path):
    return (synthetic_store(tmp_path / "tokens", [20, 15, 10, 25]), synthetic_store(tmp_path / "target", [12], seed=5))


def _mixer(stores, strategy: str, max_steps: int = 50) -> Mixer:
    return Mixer.from_dirs(stores[0], None, target=stores[1], seq_len=SEQ, batch_size=BATCH, seed=0,
                           strategy=SETTINGS[strategy], max_steps=max_steps)


def _gpt(dropout: float = 0.0) -> GPT:
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=1, n_head=2, n_embd=16, dropout=dropout))


def _moved(weights: np.ndarray) -> bool:
    return not np.allclose(weights, np.full(len(weights), 1 / len(weights)))


def _check_no_update_after_the_last_step(mixer: Mixer, steps: int) -> None:
    """The trainer told the mixer its max_steps (the stream's own bound, 50, counts micro-batches): exact DGA, every 2
    steps, skips the update after the last step, which nothing would train on."""
    assert mixer.total_steps == steps
    if isinstance(mixer.settings, DGA):
        assert mixer.strategy.updates == steps // mixer.settings.every - 1


# ---- Hugging Face -------------------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")
from dgamix.integrations.hf import STATE_FILE, MixerCallback, MixerTrainer  # noqa: E402


class _HFGPT(torch.nn.Module):
    """The reference GPT behind a Hugging Face-style forward (input_ids, labels -> loss, logits): a model every
    strategy supports, in-batch DGA included."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.gpt = _gpt(dropout)
        # Untied (the Trainer's safetensors checkpoints refuse shared tensors outside transformers' own models).
        self.gpt.lm_head.weight = torch.nn.Parameter(self.gpt.wte.weight.detach().clone())

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.gpt.loss(tokens)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.gpt(input_ids[:, :-1])
        logits = torch.cat([logits, logits[:, -1:]], dim=1)  # one position per input token, as HF models have
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = self.gpt.loss(input_ids)
        return out


def _optimizer_steps(strategy: str, accumulate: int) -> int:
    # ODM's EXP3 explores uniformly while eps_t = sqrt(ln K / (K t)) >= 1 / K: over 4 domains, its first 5 steps.
    return 8 if strategy == "odm" else STEPS // accumulate


def _hf_run(stores, out_dir, strategy: str, resume=None, workers: int = 0, accumulate: int = 1,
            dropout: float = 0.0, gpt2: bool = False):
    torch.manual_seed(0)
    if gpt2:  # a real transformers model (Conv1D layers: in-batch DGA does not reach them)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=dropout,
            embd_pdrop=dropout, attn_pdrop=dropout))
    else:
        model = _HFGPT(dropout)
    seen: list[str] = []
    model.register_forward_pre_hook(  # the training batches only (alignment batches have other sizes)
        lambda module, args, kwargs: seen.append(_digest(kwargs["input_ids"]))
        if kwargs["input_ids"].shape[0] == BATCH and module.training else None, with_kwargs=True)
    mixer = _mixer(stores, strategy).attach(model)
    args = transformers.TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=BATCH,
                                          max_steps=_optimizer_steps(strategy, accumulate),
                                          save_steps=3 if accumulate == 1 else 2,
                                          report_to=[], use_cpu=True, logging_steps=100,
                                          dataloader_num_workers=workers, gradient_accumulation_steps=accumulate)
    trainer = MixerTrainer(model=model, args=args, mixer=mixer)
    trainer.train(resume_from_checkpoint=resume)
    return seen, mixer


@pytest.mark.parametrize("strategy,workers,accumulate,dropout,gpt2", [
    ("dga", 0, 1, 0.1, True), ("dga", 2, 1, 0.0, True), ("inbatch", 2, 2, 0.1, False), ("odm", 2, 2, 0.0, False),
    ("odm", 0, 2, 0.0, True)])  # GPT-2 takes the Trainer's token count: ODM's loss is scaled as the Trainer's
def test_hf_trainer_runs_every_strategy_and_resumes_exactly(stores, tmp_path, strategy, workers, accumulate,
                                                           dropout, gpt2):
    """With dropout too: the alignment batches run under their own RNG, so the Trainer's restored RNG state is all
    an exact resume needs."""
    seen, mixer = _hf_run(stores, tmp_path / "straight", strategy, workers=workers, accumulate=accumulate,
                          dropout=dropout, gpt2=gpt2)
    steps = _optimizer_steps(strategy, accumulate)
    assert len(seen) == steps * accumulate and mixer.steps == steps
    assert _moved(mixer.weights), mixer.weights  # the strategy moved the weights
    _check_no_update_after_the_last_step(mixer, steps)
    saved_at = 3 if accumulate == 1 else 2
    checkpoint = tmp_path / f"straight/checkpoint-{saved_at}"
    assert (checkpoint / STATE_FILE).exists()
    resumed_seen, resumed = _hf_run(stores, tmp_path / "resumed", strategy, resume=str(checkpoint), workers=workers,
                                    accumulate=accumulate, dropout=dropout, gpt2=gpt2)
    assert resumed_seen == seen[saved_at * accumulate:]
    assert resumed.weights.tobytes() == mixer.weights.tobytes()


def test_hf_plain_trainer_with_the_callback_restores_the_mixer_or_refuses(stores, tmp_path):
    """A plain Trainer with MixerCallback: resuming from <output_dir>/checkpoint-N restores the mixer by itself; a
    mixer that cannot be restored is an error, not a silent restart of the data at step 0."""
    def run(out, resume=None, restore=True):  # resume: a checkpoint folder copied into `out`, as after a crash
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16,
                                                                     n_layer=1, n_head=2))
        mixer = _mixer(stores, "dga").attach(model)
        args = transformers.TrainingArguments(output_dir=str(out), per_device_train_batch_size=BATCH, max_steps=4,
                                              save_steps=2, report_to=[], use_cpu=True)  # the callback skips no data
        loader = mixer.loader(transform=lambda b: {"input_ids": b["tokens"], "labels": b["tokens"]})
        trainer = transformers.Trainer(model=model, args=args, callbacks=[MixerCallback(mixer)])
        trainer.get_train_dataloader = lambda: loader
        if resume:
            shutil.copytree(resume, out / resume.name)
            if not restore:
                (out / resume.name / STATE_FILE).unlink()
        trainer.train(resume_from_checkpoint=str(out / resume.name) if resume else None)
        return mixer

    straight = run(tmp_path / "a")
    resumed = run(tmp_path / "b", resume=tmp_path / "a/checkpoint-2")
    assert resumed.weights.tobytes() == straight.weights.tobytes() and resumed.steps == 4
    with pytest.raises(RuntimeError, match="resumed without the mixer's state"):
        run(tmp_path / "c", resume=tmp_path / "a/checkpoint-2", restore=False)


def test_hf_callback_refuses_strategies_a_plain_trainer_cannot_feed(stores):
    for strategy in ("inbatch", "odm"):
        mixer = _mixer(stores, strategy).attach(_HFGPT(0.0))
        with pytest.raises(ValueError, match="use dgamix.integrations.hf.MixerTrainer"):
            MixerCallback(mixer)


def test_hf_trainer_refuses_a_batch_size_other_than_the_mixers(stores, tmp_path):
    model = _HFGPT(0.0)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=BATCH + 1,
                                          max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="per-device batch size is 5 but the mixer plans 4"):
        MixerTrainer(model=model, args=args, mixer=_mixer(stores, "static"))


def test_hf_trainer_refuses_training_by_epochs(stores, tmp_path):
    """The stream has no epochs; a schedule derived from its remaining length would change with every resume."""
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=BATCH,
                                          report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="set max_steps > 0"):
        MixerTrainer(model=_HFGPT(0.0), args=args, mixer=_mixer(stores, "static"))


def test_alignment_leaves_the_training_rng_where_it_was(stores):
    """DGA's alignment forwards run dropout on a fork of the RNG: training draws the same masks with DGA on or off."""
    torch.manual_seed(0)
    model = _gpt(dropout=0.1).train()
    mixer = _mixer(stores, "dga").attach(model)
    before = torch.random.get_rng_state()
    mixer.step()
    assert mixer.step() is not None  # an update step: alignment batches went through the dropout model
    assert torch.equal(torch.random.get_rng_state(), before)


# ---- Lightning ----------------------------------------------------------------------------------------------
lightning = pytest.importorskip("lightning")
from dgamix.integrations.lightning import MixerCallback as LightningMixerCallback  # noqa: E402


class _TinyLM(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = _gpt()
        self.seen: list[str] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(_digest(batch["input_ids"]))
        losses = self.model.sequence_losses(batch["input_ids"])
        return {"loss": losses.mean(), "sequence_losses": losses.detach()}

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _lightning_run(stores, out_dir, strategy: str, accumulate: int, resume: str | None = None, workers: int = 0):
    torch.manual_seed(0)
    module = _TinyLM()
    mixer = _mixer(stores, strategy).attach(module.model)
    checkpoints = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=out_dir, every_n_train_steps=2, save_top_k=-1,
                                                              filename="{step}")
    trainer = lightning.Trainer(max_steps=_optimizer_steps(strategy, accumulate), accelerator="cpu", logger=False,
                                enable_progress_bar=False, enable_model_summary=False,
                                accumulate_grad_batches=accumulate,
                                callbacks=[LightningMixerCallback(mixer), checkpoints])
    trainer.fit(module, mixer.loader(num_workers=workers, transform=LightningMixerCallback.inputs), ckpt_path=resume)
    return module.seen, mixer


@pytest.mark.parametrize("strategy,accumulate,workers", [
    ("dga", 1, 0), ("dga", 2, 0), ("inbatch", 2, 2), ("odm", 2, 2)])
def test_lightning_runs_every_strategy_and_resumes_exactly(stores, tmp_path, strategy, accumulate, workers):
    seen, mixer = _lightning_run(stores, tmp_path / "straight", strategy, accumulate, workers=workers)
    steps = _optimizer_steps(strategy, accumulate)
    assert len(seen) == steps * accumulate and mixer.steps == steps
    assert _moved(mixer.weights), mixer.weights
    _check_no_update_after_the_last_step(mixer, steps)
    resumed_seen, resumed = _lightning_run(stores, tmp_path / "resumed", strategy, accumulate,
                                           resume=str(tmp_path / "straight/step=2.ckpt"), workers=workers)
    assert resumed_seen == seen[2 * accumulate:]
    assert resumed.weights.tobytes() == mixer.weights.tobytes()
