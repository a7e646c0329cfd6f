"""DGA overhead: wall time per training step with DGA against a static mixture, side by side in one run.

    make run   # data/tokens and data/bases of the embedded sample
    .venv/bin/python bench/dga_overhead.py [--steps 100]

The reference GPT (trainer/model.py defaults: 2 layers, 128 wide, seq 64, batch 16) trains on the sample's token
store. m bases are built by splitting the clusters into m seeded groups (natural within each), so any m can be
measured. For each (m, T_r, estimator) the extra time per step is reported in units of a static training step,
beside the theory for the exact estimator: (m + 1) / T_r extra gradient evaluations per step (each about one
training step's forward + backward).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp
import torch

from common import ROOT, print_table, write_result

from mixer import ClusterStore, Mixture, MixtureStream, TargetSampler
from mixer.strategies import DGAStrategy, StaticStrategy
from trainer.model import GPT, GPTConfig

SEQ, BATCH = 64, 16


def grouped_bases(store: ClusterStore, m: int) -> Mixture:
    clusters = np.flatnonzero(store.available)
    groups = np.random.default_rng(0).permutation(len(clusters)) % m
    tokens = store.cluster_tokens[clusters].astype(float)
    rows = np.zeros((m, store.n_clusters))
    for j in range(m):
        members = clusters[groups == j]
        rows[j, members] = tokens[groups == j] / tokens[groups == j].sum()
    return Mixture(sp.csr_matrix(rows), [f"group:{j}" for j in range(m)])


def time_run(store, target_store, m, every, estimator, steps) -> float:
    torch.manual_seed(0)
    mixture = grouped_bases(store, m)
    stream = MixtureStream(store, mixture, SEQ, BATCH, seed=0)
    model = GPT(GPTConfig(vocab_size=store.vocab_size, block_size=SEQ))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    if estimator == "static":
        strategy = StaticStrategy(stream)
    else:
        strategy = DGAStrategy(stream, TargetSampler(target_store, SEQ), model.loss, list(model.parameters()),
                               eta=0.3, beta=0.1, every=every, batch_size=BATCH, estimator=estimator)
    start = time.perf_counter()
    for step in range(steps):
        loss = model.loss(stream.next_batch()["tokens"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        strategy.on_step(step)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(2)
    store = ClusterStore(ROOT / "data/tokens")
    target_store = ClusterStore(ROOT / "data/bases/target")
    static = time_run(store, target_store, 8, 10, "static", args.steps)
    rows = [{"m": "-", "T_r": "-", "estimator": "static", "s_per_step": static, "overhead_steps": 0.0,
             "theory_exact": 0.0}]
    print_table(rows)
    for m in (8, 64):
        for every in (10, 50):
            for estimator in ("exact", "finite_difference"):
                seconds = time_run(store, target_store, m, every, estimator, args.steps)
                rows.append({"m": m, "T_r": every, "estimator": estimator, "s_per_step": seconds,
                             "overhead_steps": seconds / static - 1, "theory_exact": (m + 1) / every})
                print_table(rows[-1:])
    static_again = time_run(store, target_store, 8, 10, "static", args.steps)
    print()
    print_table(rows)
    print(f"static step time at the start {static:.4f} s, at the end {static_again:.4f} s (drift check)")
    print("wrote", write_result("dga_overhead", rows, {"args": vars(args), "static_end_s": static_again,
                                                       "model_parameters": GPT(GPTConfig(vocab_size=store.vocab_size,
                                                                                         block_size=SEQ)).num_params()}))


if __name__ == "__main__":
    main()
