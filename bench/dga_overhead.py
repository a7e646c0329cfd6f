"""DGA overhead: wall time per training step with DGA against a static mixture, side by side in one run.

    make run   # data/tokens and data/bases of the embedded sample
    .venv/bin/python bench/dga_overhead.py [--steps 100]

The reference GPT (trainer/model.py defaults: 2 layers, 128 wide, seq 64, batch 16) trains on the sample's token
store. m bases are built by splitting the clusters into m seeded groups (natural within each), so any m can be
measured. For each (m, T_r, estimator) the extra time per step is reported in units of a static training step,
beside the theory for the exact estimator: (m + 1) / T_r extra gradient evaluations per step (each about one
training step's forward + backward) when the alignment batch equals the training batch.

Estimators: exact (one backward per basis), finite_difference and forward (forward-mode AD), the last two with
all bases batched together through per-sequence losses. Alignment batches: as large as the training batch (16),
and small (2 sequences per basis, 16 for the target) at m = 64, T_r = 50. The score noise of small alignment
batches is measured after training: the Spearman correlation of each estimate, over 64 bases, with exact scores
on 64 sequences per basis, averaged over 3 fresh draws.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp
import torch

from common import ROOT, print_table, write_result

from dgamix.mixer import ClusterStore, Mixture, MixtureStream, TargetSampler
from dgamix.mixer.dga import ESTIMATORS
from dgamix.mixer.strategies import DGAStrategy, StaticStrategy
from dgamix.trainer.model import GPT, GPTConfig

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


def time_run(store, target_store, m, every, estimator, steps, align=BATCH, return_state=False):
    torch.manual_seed(0)
    mixture = grouped_bases(store, m)
    stream = MixtureStream(store, mixture, SEQ, BATCH, seed=0)
    model = GPT(GPTConfig(vocab_size=store.vocab_size, block_size=SEQ))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    if estimator == "static":
        strategy = StaticStrategy(stream)
    else:
        strategy = DGAStrategy(stream, TargetSampler(target_store, SEQ), model.loss, list(model.parameters()),
                               eta=0.3, beta=0.1, every=every, batch_size=align, estimator=estimator, module=model,
                               sequence_loss_fn=model.sequence_losses, target_batch_size=BATCH)
    # The training part and the strategy's part of each step are timed separately within one run, so their ratio
    # does not depend on how fast the (noisy, shared) machine happens to be during this run.
    training = mixing = 0.0
    for step in range(steps):
        start = time.perf_counter()
        loss = model.loss(stream.next_batch()["tokens"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        middle = time.perf_counter()
        strategy.on_step(step)
        training, mixing = training + middle - start, mixing + time.perf_counter() - middle
    times = (training / steps, mixing / steps)
    return (times, model, stream) if return_state else times


def score_noise(store, target_store, steps, aligns=(2, 4, 16), draws=3) -> list[dict]:
    """Spearman correlation, over the 64 bases, of small-batch estimates with exact scores on 64 sequences per
    basis, at the parameters reached by a static run of `steps` steps."""
    from scipy.stats import spearmanr

    _, model, stream = time_run(store, target_store, 64, 50, "static", steps, return_state=True)
    params = list(model.parameters())
    target = TargetSampler(target_store, SEQ)
    target_batch = [target.sample(BATCH)]
    reference = ESTIMATORS["exact"](model.loss, params, [[stream.sample_basis(j, 64)["tokens"]] for j in range(64)],
                                    target_batch)
    rows = []
    for estimator in ("exact", "finite_difference", "forward"):
        for align in aligns:
            rhos = []
            for _ in range(draws):
                batches = [[stream.sample_basis(j, align)["tokens"]] for j in range(64)]
                estimate = ESTIMATORS[estimator](model.loss, params, batches, target_batch, module=model,
                                                 sequence_loss_fn=model.sequence_losses)
                rhos.append(spearmanr(reference, estimate).statistic)
            rows.append({"estimator": estimator, "align_batch": align, "spearman_vs_exact64": float(np.mean(rhos)),
                         "min": float(np.min(rhos))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core each: experiments share the machine (ratios are within-run)
    store = ClusterStore(ROOT / "data/tokens")
    target_store = ClusterStore(ROOT / "data/targets/spec/tokens")
    rows = []
    grid = [(m, every, BATCH) for m in (8, 64) for every in (10, 50)] + [(64, 50, 2)]
    for m, every, align in grid:
        for estimator in ("exact", "finite_difference", "forward"):
            steps = max(args.steps, 2 * every)  # at least two updates
            train_s, dga_s = time_run(store, target_store, m, every, estimator, steps, align)
            rows.append({"m": m, "T_r": every, "align_batch": align, "estimator": estimator,
                         "train_s_per_step": train_s, "dga_s_per_step": dga_s, "overhead_steps": dga_s / train_s,
                         "theory_exact": (m * align / BATCH + 1) / every})
            print_table(rows[-1:], flush=True)
    print()
    print_table(rows)
    noise = score_noise(store, target_store, args.steps)
    print()
    print_table(noise)
    print("wrote", write_result("dga_overhead", rows, {"args": vars(args),
                                                       "score_noise": noise,
                                                       "model_parameters": GPT(GPTConfig(vocab_size=store.vocab_size,
                                                                                         block_size=SEQ)).num_params()}))


if __name__ == "__main__":
    main()
