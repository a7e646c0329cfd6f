"""The Hugging Face Trainer hook on a tiny GPT-2 (random init, no download), CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mixer import ClusterStore, Mixture, MixtureStream, TargetSampler
from mixer.hooks import SequenceDataset, make_hf_callback
from mixer.strategies import DGAStrategy

from .mixer_fixtures import synthetic_store

transformers = pytest.importorskip("transformers")


def test_hf_trainer_runs_dga_through_the_callback(tmp_path):
    directory = synthetic_store(tmp_path / "tokens", [20, 15, 10, 25])
    target_dir = synthetic_store(tmp_path / "target", [12], seed=5)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_positions=16, n_embd=16,
                                                                 n_layer=1, n_head=2))
    store = ClusterStore(directory)
    stream = MixtureStream(store, Mixture.identity(store.available), seq_len=8, batch_size=4, seed=0, max_steps=8)

    def loss_fn(tokens):
        return model(input_ids=tokens, labels=tokens).loss

    dga = DGAStrategy(stream, TargetSampler(ClusterStore(target_dir), 8), loss_fn, list(model.parameters()),
                      eta=1.0, beta=1.0, every=2, batch_size=2)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                                          max_steps=6, save_steps=3, report_to=[], use_cpu=True,
                                          logging_steps=100, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=SequenceDataset(stream),
                                   callbacks=[make_hf_callback(stream, dga)])
    trainer.train()
    assert len(dga.history) == 3  # steps 2, 4, 6
    assert not np.allclose(stream.weights, np.full(4, 0.25))
    assert (tmp_path / "out/checkpoint-3/dgamix_state.pt").exists()
