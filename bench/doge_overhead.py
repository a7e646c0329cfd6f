"""DoGE at the reference cadence: wall time per training step with DoGE updating at every optimizer step, against a
uniform (static) mixture and against exact DGA every 20 steps, side by side in one run.

    .venv/bin/python bench/doge_overhead.py [--rounds 6] [--per-round 10] [--bases 8 35]

The reference GPT (trainer/model.py defaults: 2 layers, 128 wide, vocabulary 8,192, seq 64, batch 16) trains on a
seeded synthetic token store (bench/work/doge_store: 64 clusters whose documents each draw from their own band of
the vocabulary), so the bench needs no pipeline run. m bases = the clusters split into m seeded groups
(`dga_overhead.grouped_bases`). Per m, three configurations train side by side, `per_round` steps each per round,
rounds interleaved so that the machine's drift hits them alike:

- uniform: the static uniform mixture (the cost of a training step);
- DoGE, every step: `DoGE()`'s defaults (every = 1; batch_size None: max(world, 16 // (m + 1)) sequences per basis
  and as many of the target);
- exact DGA, T_r = 20: `DGA()`'s defaults (8 sequences per basis and 8 of the target every 20 steps).

Overheads are against the uniform run of the same m. Model: a training step is about 3 forwards of 16 sequences;
DoGE adds (m + 1) forward and backward passes of b sequences per step, (m + 1) b / 16 training steps of FLOPs; DGA
adds (m + 1) 8 / 16 / 20.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from common import ROOT, print_table, write_result
from dga_overhead import grouped_bases, run_interleaved, timed_steps

from dgamix.formats import token_store
from dgamix.mixer import ClusterStore, MixtureStream, TargetSampler
from dgamix.mixer.strategies import DGAStrategy, DoGEStrategy, StaticStrategy
from dgamix.mixer.strategies.doge import reference_share
from dgamix.trainer.model import GPT, GPTConfig

SEQ, BATCH, VOCAB, CLUSTERS, DGA_EVERY, DGA_BATCH = 64, 16, 8192, 64, 20, 8


def synthetic(directory, clusters: int, docs: int, seed: int) -> ClusterStore:
    """`clusters` clusters of `docs` documents (100 to 400 tokens), cluster c's tokens drawn from its own band of
    the vocabulary; EOS = 0."""
    if not (directory / token_store.META).exists():
        rng = np.random.default_rng(seed)
        band = (VOCAB - 1) // clusters
        chunks = []
        for c in range(clusters):
            lengths = rng.integers(100, 400, size=docs) + 1
            tokens = np.concatenate([np.r_[rng.integers(1 + c * band, 1 + (c + 1) * band, size=n - 1), 0]
                                     for n in lengths]).astype(np.uint16)
            chunks.append((tokens, lengths.astype(np.int64)))
        directory.mkdir(parents=True, exist_ok=True)
        token_store.write(directory, chunks, np.full(clusters, docs), {"vocab_size": VOCAB, "eos_id": 0})
    return ClusterStore(directory)


class Run:
    """One configuration's training state, stepped a round at a time (so configurations can be interleaved)."""

    def __init__(self, kind: str, store: ClusterStore, target_store: ClusterStore, m: int):
        torch.manual_seed(0)
        self.kind, self.m = kind, m
        self.stream = MixtureStream(store, grouped_bases(store, m), SEQ, BATCH, seed=0)
        self.model = GPT(GPTConfig(vocab_size=VOCAB, block_size=SEQ))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-3)
        target, params = TargetSampler(target_store, SEQ), list(self.model.parameters())
        lr_fn = lambda: self.optimizer.param_groups[0]["lr"]  # noqa: E731
        if kind == "uniform":
            self.strategy = StaticStrategy(self.stream)
        elif kind == "doge":
            self.strategy = DoGEStrategy(self.stream, target=target, loss_fn=self.model.loss, params=params,
                                         lr_fn=lr_fn)
        else:
            self.strategy = DGAStrategy(self.stream, target=target, loss_fn=self.model.loss, params=params,
                                        every=DGA_EVERY, batch_size=DGA_BATCH)
        self.step, self.times = 0, []

    def run(self, steps: int) -> None:
        timed_steps(self, steps)


def table(store, target_store, bases, rounds, per_round) -> list[dict]:
    configs = {}
    for m in bases:
        configs[f"uniform, m = {m}"] = Run("uniform", store, target_store, m)
        configs[f"DoGE every step, m = {m}"] = Run("doge", store, target_store, m)
        configs[f"exact DGA T_r = {DGA_EVERY}, m = {m}"] = Run("dga", store, target_store, m)
    run_interleaved(configs, rounds, per_round)
    rows = []
    for name, run in configs.items():
        base = configs[f"uniform, m = {run.m}"]
        mean, median = float(np.mean(run.times)), float(np.median(run.times))
        b = reference_share(run.stream)
        flops = {"uniform": 0.0, "doge": (run.m + 1) * b / BATCH,
                 "dga": (run.m + 1) * DGA_BATCH / BATCH / DGA_EVERY}[run.kind]
        rows.append({"configuration": name, "align_per_basis": {"uniform": None, "doge": b, "dga": DGA_BATCH}[run.kind],
                     "s_per_step": mean, "x_uniform_mean": mean / float(np.mean(base.times)),
                     "x_uniform_median": median / float(np.median(base.times)),
                     "flop_model_x": 1 + flops, "updates": getattr(run.strategy, "updates", None),
                     "steps": len(run.times)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--bases", type=int, nargs="+", default=[8, 35])
    args = parser.parse_args()
    torch.set_num_threads(1)  # ratios are within-run; one core leaves the other to the machine
    store = synthetic(ROOT / "bench/work/doge_store", CLUSTERS, 40, seed=0)
    target_store = synthetic(ROOT / "bench/work/doge_target", 1, 200, seed=1)
    rows = table(store, target_store, args.bases, args.rounds, args.per_round)
    print_table(rows)
    print("wrote", write_result("doge_overhead", rows, {"args": vars(args)}))


if __name__ == "__main__":
    main()
