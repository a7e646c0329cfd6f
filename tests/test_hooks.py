"""The Hugging Face Trainer and Lightning hooks on tiny models (random init, no download), CPU: DGA runs through
each callback, and a run resumed from the trainer's own checkpoint trains on the same sequences under the same
weights as a straight run, although both trainers prefetch a batch ahead."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dgamix.mixer import ClusterStore, Mixture, MixtureStream, TargetSampler
from dgamix.mixer.hooks import SequenceDataset, make_hf_callback, make_hf_trainer_class, make_lightning_callback
from dgamix.mixer.loader import MixtureLoader
from dgamix.mixer.strategies import DGAStrategy, ODMStrategy, StaticStrategy

from .mixer_fixtures import synthetic_store

STEPS, BATCH, SEQ = 8, 4, 8


def _digest(tokens: torch.Tensor) -> str:
    return hashlib.blake2b(tokens.numpy().tobytes(), digest_size=8).hexdigest()


@pytest.fixture
def stores(tmp_path):
    return (synthetic_store(tmp_path / "tokens", [20, 15, 10, 25]), synthetic_store(tmp_path / "target", [12], seed=5))


def _stream_and_dga(stores, model, loss_fn):
    store = ClusterStore(stores[0])
    stream = MixtureStream(store, Mixture.identity(store.available), seq_len=SEQ, batch_size=BATCH, seed=0)
    dga = DGAStrategy(stream, TargetSampler(ClusterStore(stores[1]), SEQ), loss_fn, list(model.parameters()),
                      eta=3.0, beta=1.0, every=2, batch_size=2)
    return stream, dga


# ---- Hugging Face -------------------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")


def _hf_run(stores, out_dir, resume: str | None = None, workers: int | None = None, dropout: float = 0.0):
    """workers None: the Trainer over SequenceDataset (in-process); an int: make_hf_trainer_class with that many
    DataLoader workers (the stream planned in the main process)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=128, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    model = transformers.GPT2LMHeadModel(config)
    seen: list[str] = []
    model.register_forward_pre_hook(  # the training batches only (alignment batches have 2 sequences)
        lambda module, args, kwargs: seen.append(_digest(kwargs["input_ids"]))
        if kwargs["input_ids"].shape[0] == BATCH else None, with_kwargs=True)
    stream, dga = _stream_and_dga(stores, model, lambda tokens: model(input_ids=tokens, labels=tokens).loss)
    stream.max_steps = 50
    callback = make_hf_callback(stream, dga)
    args = transformers.TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=BATCH,
                                          max_steps=STEPS, save_steps=3, report_to=[], use_cpu=True,
                                          logging_steps=100, dataloader_num_workers=workers or 0,
                                          ignore_data_skip=True)
    if workers is None:
        trainer = transformers.Trainer(model=model, args=args, train_dataset=SequenceDataset(stream),
                                       callbacks=[callback])
    else:
        trainer = make_hf_trainer_class(stream)(model=model, args=args, callbacks=[callback])
    if resume:
        callback.load(resume)
    trainer.train(resume_from_checkpoint=resume)
    return seen, stream.weights, dga


@pytest.mark.parametrize("workers,dropout", [(None, 0.0), (2, 0.0), (None, 0.1)])
def test_hf_trainer_runs_dga_and_resumes_exactly(stores, tmp_path, workers, dropout):
    """With dropout too: the alignment batches run under their own RNG, so the Trainer's restored RNG state is all
    an exact resume needs."""
    seen, weights, dga = _hf_run(stores, tmp_path / "straight", workers=workers, dropout=dropout)
    assert len(seen) == STEPS and dga.updates == STEPS // 2
    assert not np.allclose(weights, np.full(4, 0.25))  # DGA moved the weights
    checkpoint = tmp_path / "straight/checkpoint-3"
    assert (checkpoint / "dgamix_state.pt").exists()
    resumed_seen, resumed_weights, _ = _hf_run(stores, tmp_path / "resumed", resume=str(checkpoint), workers=workers,
                                               dropout=dropout)
    assert resumed_seen == seen[3:]
    np.testing.assert_array_equal(resumed_weights, weights)


# ---- Lightning ----------------------------------------------------------------------------------------------
lightning = pytest.importorskip("lightning")


class _TinyLM(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        from dgamix.trainer.model import GPT, GPTConfig

        self.model = GPT(GPTConfig(vocab_size=128, block_size=SEQ, n_layer=1, n_head=2, n_embd=16))
        self.seen: list[str] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(_digest(batch["input_ids"]))
        return self.model.loss(batch["input_ids"])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _lightning_run(stores, out_dir, accumulate: int, resume: str | None = None, workers: int | None = None):
    torch.manual_seed(0)
    module = _TinyLM()
    stream, dga = _stream_and_dga(stores, module.model, module.model.loss)
    stream.max_steps = 50
    checkpoints = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=out_dir, every_n_train_steps=2, save_top_k=-1,
                                                              filename="{step}")
    trainer = lightning.Trainer(max_steps=STEPS // accumulate, accelerator="cpu", logger=False,
                                enable_progress_bar=False, enable_model_summary=False,
                                accumulate_grad_batches=accumulate,
                                callbacks=[make_lightning_callback(stream, dga), checkpoints])
    loader = (DataLoader(SequenceDataset(stream), batch_size=BATCH) if workers is None
              else MixtureLoader(stream, num_workers=workers,
                                 transform=lambda batch: {"input_ids": batch["tokens"]}).dataloader)
    trainer.fit(module, loader, ckpt_path=resume)
    return module.seen, stream.weights, dga


@pytest.mark.parametrize("accumulate,workers", [(1, None), (2, None), (2, 2)])
def test_lightning_runs_dga_and_resumes_exactly(stores, tmp_path, accumulate, workers):
    seen, weights, dga = _lightning_run(stores, tmp_path / "straight", accumulate, workers=workers)
    optimizer_steps = STEPS // accumulate
    assert len(seen) == STEPS and dga.updates == optimizer_steps // 2
    assert not np.allclose(weights, np.full(4, 0.25))
    resumed_seen, resumed_weights, _ = _lightning_run(stores, tmp_path / "resumed", accumulate,
                                                      resume=str(tmp_path / "straight/step=2.ckpt"),
                                                      workers=workers)
    assert resumed_seen == seen[2 * accumulate:]
    np.testing.assert_array_equal(resumed_weights, weights)


# ---- what the hooks refuse ------------------------------------------------------------------------------------
def test_hooks_refuse_strategies_that_learn_from_every_batch(stores):
    """ODM needs each batch's per-sequence losses, which callbacks never receive: it would stay uniform silently."""
    store = ClusterStore(stores[0])
    stream = MixtureStream(store, Mixture.identity(store.available), seq_len=SEQ, batch_size=BATCH)
    for make in (make_hf_callback, make_lightning_callback):
        with pytest.raises(ValueError, match="ODMStrategy learns from every training batch"):
            make(stream, ODMStrategy(stream))


def test_hf_trainer_refuses_a_batch_size_other_than_the_streams(stores, tmp_path):
    store = ClusterStore(stores[0])
    stream = MixtureStream(store, Mixture.identity(store.available), seq_len=SEQ, batch_size=BATCH)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_positions=16, n_embd=16,
                                                                 n_layer=1, n_head=2))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=BATCH + 1,
                                          max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="per-device batch size is 5 but the stream plans 4"):
        make_hf_trainer_class(stream)(model=model, args=args)


def test_hf_trainer_refuses_sequence_dataset_under_workers_before_training(stores, tmp_path):
    """Workers iterate copies of the stream: the first checkpoint used to fail after the Trainer had written its
    folder, leaving a checkpoint without the mixer's state. Now training does not start."""
    store = ClusterStore(stores[0])
    stream = MixtureStream(store, Mixture.identity(store.available), seq_len=SEQ, batch_size=BATCH, max_steps=50)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_positions=16, n_embd=16,
                                                                 n_layer=1, n_head=2))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_steps=4,
                                          save_steps=2, report_to=[], use_cpu=True, dataloader_num_workers=2,
                                          ignore_data_skip=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=SequenceDataset(stream),
                                   callbacks=[make_hf_callback(stream, StaticStrategy(stream))])
    with pytest.raises(ValueError, match="use make_hf_trainer_class"):
        trainer.train()
    assert not list(tmp_path.glob("checkpoint-*"))


def test_alignment_leaves_the_training_rng_where_it_was(stores):
    """DGA's alignment forwards run dropout on a fork of the RNG: training draws the same masks with DGA on or off."""
    from dgamix.trainer.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=128, block_size=SEQ, n_layer=1, n_head=2, n_embd=16, dropout=0.1)).train()
    stream, dga = _stream_and_dga(stores, model, model.loss)
    before = torch.random.get_rng_state()
    assert dga.on_step(1) is not None  # an update step: alignment batches went through the dropout model
    assert torch.equal(torch.random.get_rng_state(), before)


def test_hf_trainer_class_refuses_training_by_epochs(stores, tmp_path):
    """The stream has no epochs; a schedule derived from its remaining length would change with every resume."""
    store = ClusterStore(stores[0])
    stream = MixtureStream(store, Mixture.identity(store.available), seq_len=SEQ, batch_size=BATCH, max_steps=10)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_positions=16, n_embd=16,
                                                                 n_layer=1, n_head=2))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=BATCH,
                                          report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="set max_steps > 0"):
        make_hf_trainer_class(stream)(model=model, args=args)


def test_lightning_refuses_sequence_dataset_under_workers_before_training(stores, tmp_path):
    torch.manual_seed(0)
    module = _TinyLM()
    stream, dga = _stream_and_dga(stores, module.model, module.model.loss)
    stream.max_steps = 50
    trainer = lightning.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                                enable_model_summary=False, enable_checkpointing=False,
                                callbacks=[make_lightning_callback(stream, dga)])
    with pytest.raises(ValueError, match="pass MixtureLoader"):
        trainer.fit(module, DataLoader(SequenceDataset(stream), batch_size=BATCH, num_workers=2))
    assert module.seen == []
