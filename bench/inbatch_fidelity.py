"""Fidelity of the low-rank in-batch scores, per cluster, over many training states, on real text.

    .venv/bin/python experiments/experiments.py prepare --target medical_abstracts   # once: the 16x16 development store
    .venv/bin/python bench/inbatch_fidelity.py [--target medical_abstracts] [--steps 300] [--every 25] [--batches 48]
        [--model gpt | gpt2 | llama | gpt_neox]
    # writes bench/results/inbatch_fidelity.json (inbatch_fidelity_<model>.json for a transformers model)

The reference GPT (the experiments' size: 2 layers, 128 wide, batch 16 x 64), or with --model a transformers causal
LM of that size (`inbatch_overhead.build_model`, trained on its own loss), trains under the uniform mixture of the
development corpus's 256 fine clusters (Mixture.identity). Every `--every` steps (a training state), with the
parameters frozen, `--batches` fresh batches of the stream are scored by an exact tracker and by low-rank trackers
on the same model and the same backward (trackers never change gradients), against g_spe from the target's spec
set refreshed at that state. Per state: the per-cluster mean alignment under each mode over the clusters seen, and
the Spearman rank correlation of the low-rank per-cluster means with the exact ones (the ordering is what the
update acts on), plus the per-sequence Spearman and the share of g_spe's squared norm the factors capture.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Callable

import numpy as np
import torch
from scipy.stats import spearmanr

from common import WORK, print_table, write_result
from inbatch_overhead import MODELS, build_model

from dgamix.mixer import ClusterStore, Mixture, MixtureStream, TargetSampler
from dgamix.mixer.inbatch import InBatchAlignment, mean_loss_scale

BATCH, SEQ = 16, 64
MODES = {"exact": {}, "rank 8, head only": {"rank": 8}, "rank 8, every Linear": {"rank": 8, "low_rank_min_params": 0},
         "rank 32, every Linear": {"rank": 32, "low_rank_min_params": 0}}


def per_cluster_means(clusters: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    counts = np.bincount(clusters, minlength=k)
    sums = np.bincount(clusters, weights=scores, minlength=k)
    seen = counts > 0
    return sums[seen] / counts[seen], counts[seen]


def score_state(model: torch.nn.Module, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                trackers: dict[str, InBatchAlignment], stream: MixtureStream, target: TargetSampler,
                batches: int) -> dict[str, dict[str, float]]:
    target_batch = target.sample(BATCH)
    for name, tracker in trackers.items():  # g_spe at this state, the same batch (each tracker factorizes it)
        with paused({other: t for other, t in trackers.items() if other != name}):
            tracker.refresh_target(loss_fn, [target_batch])
    scores = {name: [] for name in trackers}
    clusters = []
    for _ in range(batches):
        batch = stream.next_batch()
        model.zero_grad(set_to_none=True)
        loss_fn(batch["tokens"]).backward()
        for name, tracker in trackers.items():
            scores[name].append(tracker.collect(loss_scale=mean_loss_scale(BATCH), n_sequences=BATCH).cpu().numpy())
            tracker.take()
        clusters.append(batch["cluster"].numpy())
    model.zero_grad(set_to_none=True)
    clusters = np.concatenate(clusters)
    k = stream.mixture.n_clusters
    exact = np.concatenate(scores["exact"])
    exact_means, counts = per_cluster_means(clusters, exact, k)
    out = {}
    for name, tracker in trackers.items():
        if name == "exact":
            continue
        approx = np.concatenate(scores[name])
        means, _ = per_cluster_means(clusters, approx, k)
        captured = [layer["captured"] for layer in tracker.low_rank_layers.values()] or [1.0]
        out[name] = {"cluster_spearman": float(spearmanr(exact_means, means).statistic),
                     "sequence_spearman": float(spearmanr(exact, approx).statistic),
                     "clusters": int(len(counts)), "min_captured": float(min(captured))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default="medical_abstracts")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--batches", type=int, default=48, help="fresh batches scored per training state")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", choices=MODELS, default="gpt")
    parser.add_argument("--name", default=None, help="result file name (default: from --model)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = WORK / "exp" / "16x16"
    store = ClusterStore(base / "tokens")
    if not (base / args.target / "targets" / "spec" / "tokens").exists():
        raise SystemExit(f"{base / args.target}: run experiments/experiments.py prepare --target {args.target} first")
    mixture = Mixture.identity(store.available)
    train_stream = MixtureStream(store, mixture, SEQ, BATCH, seed=0)
    probe_stream = MixtureStream(store, mixture, SEQ, BATCH, seed=1)  # fresh sequences, not the trained ones
    target = TargetSampler(ClusterStore(base / args.target / "targets" / "spec" / "tokens"), SEQ)
    torch.manual_seed(0)
    model, loss_fn = build_model(args.model, vocab=store.vocab_size, seq=SEQ)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    trackers = {name: InBatchAlignment(model, **options) for name, options in MODES.items()}
    states = []
    start = time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.every == 0:
            result = score_state(model, loss_fn, trackers, probe_stream, target, args.batches)
            states.append({"step": step, **{f"{name}: {key}": value for name, row in result.items()
                                            for key, value in row.items()}})
            print(f"step {step}: " + ", ".join(f"{name} {row['cluster_spearman']:.3f}" for name, row in result.items()),
                  flush=True)
        if step == args.steps:
            break
        with paused(trackers):
            loss = loss_fn(train_stream.next_batch()["tokens"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    rows = []
    for name in MODES:
        if name == "exact":
            continue
        cluster = [s[f"{name}: cluster_spearman"] for s in states]
        sequence = [s[f"{name}: sequence_spearman"] for s in states]
        rows.append({"mode": name, "states": len(states), "cluster Spearman median": statistics.median(cluster),
                     "cluster Spearman min": min(cluster), "sequence Spearman median": statistics.median(sequence),
                     "min captured": min(s[f"{name}: min_captured"] for s in states),
                     "clusters per state": statistics.median(s[f"{name}: clusters"] for s in states)})
    print_table(rows)
    print(f"{time.perf_counter() - start:.0f} s")
    name = args.name or ("inbatch_fidelity" if args.model == "gpt" else f"inbatch_fidelity_{args.model}")
    print("wrote", write_result(name, rows, {"states": states, "args": vars(args)}))


def paused(trackers: dict[str, InBatchAlignment]) -> contextlib.ExitStack:
    """Every tracker paused: the training steps between the scored states are not scored."""
    stack = contextlib.ExitStack()
    for tracker in trackers.values():
        stack.enter_context(tracker.paused())
    return stack


if __name__ == "__main__":
    main()
