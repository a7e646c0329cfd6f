"""The Hugging Face and Lightning integrations on tiny models (random init, no download), CPU: every strategy runs
through each of them (in-batch DGA and ODM included, with DataLoader workers and gradient accumulation), and a run
resumed from the trainer's own checkpoint trains on the same sequences and ends with the same weights, bit for bit,
as a straight run, although both trainers prefetch ahead; so does a plain loop through `Mixer.save` / `Mixer.load`.
Models with dropout resume exactly too: the RNG states travel with each checkpoint."""
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
    # The models' vocabulary is the stores' (the integrations refuse a model with fewer token ids than the store).
    return (synthetic_store(tmp_path / "tokens", [20, 15, 10, 25], vocab=VOCAB),
            synthetic_store(tmp_path / "target", [12], seed=5, vocab=VOCAB))


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


def _parameters(model: torch.nn.Module) -> dict[str, bytes]:
    return {name: p.detach().cpu().numpy().tobytes() for name, p in model.named_parameters()}


# ---- a plain loop -------------------------------------------------------------------------------------------
def _plain_loop(stores, path, workers: int, resume: bool = False, save_at: int = 3, steps: int = 6):
    """The README's loop with a dropout model, checkpointed with Mixer.save after step `save_at`; with `resume`, the
    same objects built again and restored with Mixer.load, then the rest of the loop."""
    torch.manual_seed(0)
    model = _gpt(dropout=0.1).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mixer = _mixer(stores, "dga", max_steps=steps).attach(model, optimizer=optimizer)
    if resume:
        torch.manual_seed(1234)  # another RNG state than the straight run's at the checkpoint: load must restore it
        assert mixer.load(path, model=model, optimizer=optimizer) == {"note": "mid-run"}
    for batch in mixer.loader(num_workers=workers):
        with mixer.training_step():
            optimizer.zero_grad()
            model.loss(batch["tokens"]).backward()
        mixer.observe(batch)
        optimizer.step()
        mixer.step()
        if not resume and mixer.steps == save_at:
            mixer.save(path, model=model, optimizer=optimizer, extra={"note": "mid-run"})
    return model, mixer


@pytest.mark.parametrize("workers", [0, 2])
def test_plain_loop_with_dropout_resumes_bit_exactly_from_mixer_save(stores, tmp_path, workers):
    """Mixer.save holds the mixer, model, optimizer and RNG states: a loop killed after step 3 and resumed through
    Mixer.load ends with the same parameters and weights, bit for bit, as the uninterrupted loop."""
    model, mixer = _plain_loop(stores, tmp_path / "c.pt", workers)
    assert mixer.steps == 6 and _moved(mixer.weights)
    resumed_model, resumed = _plain_loop(stores, tmp_path / "c.pt", workers, resume=True)
    assert resumed.steps == 6
    assert resumed.weights.tobytes() == mixer.weights.tobytes()
    assert _parameters(resumed_model) == _parameters(model)


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


def _gpt2(n_positions: int = 16, vocab: int = VOCAB):
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=16,
                                                                n_layer=1, n_head=2))


def _plain_hf_trainer(mixer: Mixer, model, out, batch_size: int = BATCH, max_steps: int = 4):
    """A plain transformers.Trainer fed by the mixer's loader, with the MixerCallback."""
    args = transformers.TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch_size,
                                          max_steps=max_steps, save_steps=2, report_to=[], use_cpu=True)
    loader = mixer.loader(transform=lambda b: {"input_ids": b["tokens"], "labels": b["tokens"]})
    callback = MixerCallback(mixer)
    trainer = transformers.Trainer(model=model, args=args, callbacks=[callback])
    trainer.get_train_dataloader = lambda: loader
    return trainer, callback


def test_hf_plain_trainer_with_the_callback_restores_the_mixer_or_refuses(stores, tmp_path):
    """A plain Trainer with MixerCallback: resuming from <output_dir>/checkpoint-N restores the mixer by itself, and
    from a checkpoint elsewhere after `callback.load(checkpoint)`; a resume that forgets it (or whose checkpoint
    lacks the mixer's state) is an error that says what to call, not a silent restart of the data at step 0 under
    the initial weights."""
    forwards: list[int] = []

    def run(out, resume=None, copy=True, restore=True, load=False):
        # resume: a checkpoint folder, copied into `out` (as after a crash) or used where it lies
        model = _gpt2()
        model.register_forward_pre_hook(lambda *args: forwards.append(1))
        mixer = _mixer(stores, "dga").attach(model)
        trainer, callback = _plain_hf_trainer(mixer, model, out)
        if resume and copy:
            shutil.copytree(resume, out / resume.name)
            resume = out / resume.name
            if not restore:
                (resume / STATE_FILE).unlink()
        if load:
            callback.load(resume)
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        return mixer

    straight = run(tmp_path / "a")
    resumed = run(tmp_path / "b", resume=tmp_path / "a/checkpoint-2")
    assert resumed.weights.tobytes() == straight.weights.tobytes() and resumed.steps == 4
    forwards.clear()
    with pytest.raises(RuntimeError, match="resumed without the mixer's state"):
        run(tmp_path / "c", resume=tmp_path / "a/checkpoint-2", restore=False)
    with pytest.raises(RuntimeError, match=r"at optimizer step 2 but the mixer at step 0.*call "
                                           r"MixerCallback.load\(checkpoint\) first"):
        run(tmp_path / "d", resume=tmp_path / "a/checkpoint-2", copy=False)
    assert not forwards  # refused when training begins: not one step trained on the restarted data
    elsewhere = run(tmp_path / "e", resume=tmp_path / "a/checkpoint-2", copy=False, load=True)
    assert elsewhere.weights.tobytes() == straight.weights.tobytes() and elsewhere.steps == 4


def test_hf_plain_trainer_refuses_a_batch_size_other_than_the_mixers(stores, tmp_path):
    """The callback's own check (MixerTrainer checks in its constructor): with a per-device batch size other than
    the mixer's, each Trainer step would not be one planned step."""
    model = _gpt2()
    trainer, _ = _plain_hf_trainer(_mixer(stores, "static"), model, tmp_path, batch_size=BATCH + 1)
    with pytest.raises(ValueError, match="per-device batch size is 5 but the mixer plans 4"):
        trainer.train()


@pytest.mark.parametrize("n_positions,vocab,message", [
    (SEQ, VOCAB, r"at most 8 positions \(config.n_positions\).*9 tokens per sequence.*set n_positions >= 9"),
    (SEQ + 1, VOCAB - 1, r"vocabulary has 127 token ids but the mixer's token store has 128.*vocab_size >= 128")])
def test_hf_refuses_a_model_too_small_for_the_data_before_training(stores, tmp_path, n_positions, vocab, message):
    """Instead of torch's bare "index out of range in self" inside the embedding, at the first step: which setting to
    change, when the Trainer is built (MixerTrainer) or starts (a plain Trainer with the callback)."""
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "m"), per_device_train_batch_size=BATCH,
                                          max_steps=1, report_to=[], use_cpu=True)
    model = _gpt2(n_positions, vocab)
    with pytest.raises(ValueError, match=message):
        MixerTrainer(model=model, args=args, mixer=_mixer(stores, "dga").attach(model)).train()
    model = _gpt2(n_positions, vocab)
    trainer, _ = _plain_hf_trainer(_mixer(stores, "dga").attach(model), model, tmp_path / "p", max_steps=1)
    with pytest.raises(ValueError, match=message):
        trainer.train()
    fits = _gpt2(SEQ + 1, VOCAB)  # seq_len + 1 positions and the store's vocabulary: enough
    MixerTrainer(model=fits, args=args, mixer=_mixer(stores, "dga").attach(fits)).train()


def test_hf_callback_refuses_strategies_a_plain_trainer_cannot_feed(stores):
    """The reason given is the true one: a plain Trainer's callbacks see each step (and the end of each backward)
    but never the batch, which these strategies learn from."""
    for strategy in ("inbatch", "odm"):
        mixer = _mixer(stores, strategy).attach(_HFGPT(0.0))
        with pytest.raises(ValueError, match="a plain Trainer never hands the batch to its callbacks: use "
                                             "dgamix.integrations.hf.MixerTrainer"):
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
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.model = _gpt(dropout)
        self.seen: list[str] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(_digest(batch["input_ids"]))
        losses = self.model.sequence_losses(batch["input_ids"])
        return {"loss": losses.mean(), "sequence_losses": losses.detach()}

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _lightning_run(stores, out_dir, strategy: str, accumulate: int, resume: str | None = None, workers: int = 0,
                   dropout: float = 0.0, logger=False):
    torch.manual_seed(0)
    module = _TinyLM(dropout)
    mixer = _mixer(stores, strategy).attach(module.model)
    checkpoints = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=out_dir, every_n_train_steps=2, save_top_k=-1,
                                                              filename="{step}")
    trainer = lightning.Trainer(max_steps=_optimizer_steps(strategy, accumulate), accelerator="cpu", logger=logger,
                                enable_progress_bar=False, enable_model_summary=False,
                                accumulate_grad_batches=accumulate,
                                callbacks=[LightningMixerCallback(mixer), checkpoints])
    if resume:
        torch.manual_seed(1234)  # not the straight run's RNG state at the checkpoint: the callback must restore it
    trainer.fit(module, mixer.loader(num_workers=workers, transform=LightningMixerCallback.inputs), ckpt_path=resume)
    return module.seen, mixer, module


@pytest.mark.parametrize("strategy,accumulate,workers,dropout", [
    ("dga", 1, 0, 0.1), ("dga", 2, 0, 0.0), ("inbatch", 2, 2, 0.1), ("odm", 2, 2, 0.0)])
def test_lightning_runs_every_strategy_and_resumes_exactly(stores, tmp_path, strategy, accumulate, workers, dropout):
    """With dropout too: the callback keeps the RNG states in Lightning's checkpoint, so the resumed run ends with
    the same parameters as the straight run, bit for bit."""
    seen, mixer, module = _lightning_run(stores, tmp_path / "straight", strategy, accumulate, workers=workers,
                                         dropout=dropout)
    steps = _optimizer_steps(strategy, accumulate)
    assert len(seen) == steps * accumulate and mixer.steps == steps
    assert _moved(mixer.weights), mixer.weights
    _check_no_update_after_the_last_step(mixer, steps)
    resumed_seen, resumed, resumed_module = _lightning_run(
        stores, tmp_path / "resumed", strategy, accumulate, resume=str(tmp_path / "straight/step=2.ckpt"),
        workers=workers, dropout=dropout)
    assert resumed_seen == seen[2 * accumulate:]
    assert resumed.weights.tobytes() == mixer.weights.tobytes()
    assert _parameters(resumed_module) == _parameters(module)


def _lightning_trainer(mixer: Mixer, **kwargs) -> lightning.Trainer:
    return lightning.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False,
                             callbacks=[LightningMixerCallback(mixer)], **kwargs)


def test_lightning_refuses_a_dataloader_whose_batch_size_is_not_the_mixers(stores):
    """A DataLoader of the user's own (not mixer.loader) must batch as the mixer plans: each trainer batch one
    planned step."""
    mixer = _mixer(stores, "static")
    rows = [{"input_ids": batch["tokens"][i], "cluster": batch["cluster"][i], "prob": batch["prob"][i]}
            for batch in (mixer.stream.next_batch() for _ in range(3)) for i in range(BATCH)]
    loader = torch.utils.data.DataLoader(rows, batch_size=BATCH + 1)
    with pytest.raises(ValueError, match="Lightning DataLoader's per-device batch size is 5 but the mixer plans 4"):
        _lightning_trainer(mixer).fit(_TinyLM(), loader)


class _HFInLightning(lightning.LightningModule):
    """A transformers causal LM inside a LightningModule, fed the shifted inputs."""

    def __init__(self, n_positions: int, vocab: int) -> None:
        super().__init__()
        self.lm = _gpt2(n_positions, vocab)

    def training_step(self, batch, batch_idx):
        return self.lm(input_ids=batch["input_ids"][:, :-1], labels=batch["input_ids"][:, :-1]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


@pytest.mark.parametrize("n_positions,vocab,message", [
    (SEQ - 1, VOCAB, r"at most 7 positions \(config.n_positions\).*8 tokens per sequence.*set n_positions >= 8"),
    (SEQ, VOCAB - 1, r"vocabulary has 127 token ids but the mixer's token store has 128.*vocab_size >= 128")])
def test_lightning_refuses_a_transformers_model_too_small_for_the_data(stores, n_positions, vocab, message):
    mixer = _mixer(stores, "static")
    with pytest.raises(ValueError, match=message):
        _lightning_trainer(mixer).fit(_HFInLightning(n_positions, vocab),
                                      mixer.loader(transform=LightningMixerCallback.inputs))
    mixer = _mixer(stores, "static")  # seq_len positions (the shifted inputs) and the store's vocabulary: enough
    _lightning_trainer(mixer).fit(_HFInLightning(SEQ, VOCAB), mixer.loader(transform=LightningMixerCallback.inputs))
    assert mixer.steps == 2


def test_the_lightning_transform_works_in_spawned_workers(stores):
    """MixerCallback.inputs (the README's transform) pickles: DataLoader workers started by spawn (the default on
    macOS and Windows) hand out the same batches as the main process."""
    def batches(**kwargs):
        loader = _mixer(stores, "static", max_steps=6).loader(transform=LightningMixerCallback.inputs, **kwargs)
        return [{k: _digest(v) for k, v in batch.items()} for batch in loader]

    in_process = batches()
    assert len(in_process) == 6 and set(in_process[0]) == {"input_ids", "cluster", "prob"}
    assert batches(num_workers=2, multiprocessing_context="spawn") == in_process
