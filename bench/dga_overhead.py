"""DGA overhead: wall time per training step with DGA against a static mixture, side by side in one run.

    make run   # data/tokens and data/bases of the embedded sample
    .venv/bin/python bench/dga_overhead.py [--steps 100]

The reference GPT (trainer/model.py defaults: 2 layers, 128 wide, seq 64, batch 16) trains on the sample's token
store. m bases are built by splitting the clusters into m seeded groups (natural within each), so any m can be
measured. For each (m, T_r, estimator) the extra time per step is reported in units of a static training step,
beside the theory for the exact estimator: (m + 1) / T_r extra gradient evaluations per step (each about one
training step's forward + backward) when the alignment batch equals the training batch.

The update rules (`--rules`): the anchored rule's cost against the paper's, exact DGA and in-batch DGA, interleaved.

In-batch DGA (`--inbatch`, the table the README quotes): total wall time per step of the reference GPT with the
in-batch strategy over every fine cluster (domain reweighting) at 256 clusters (the sample) and 4,096 clusters (the
sample's documents dealt round-robin into 4,096 clusters), scoring and updating every step and every 10 steps,
against a static mixture and against exact DGA at m = 19 and 64 bases (T_r = 20), all in one run, in one process,
configurations interleaved round by round so that the machine's drift hits them alike. FLOP model beside it: a
training step is about 3 forwards (6 N T FLOPs for N weights and T tokens); the in-batch scores add about one
forward per scored step (2 N T: <delta, G a> per linear layer) plus the target gradient every T_r steps; exact
DGA adds (m + 1) forward + backward passes every T_r steps.

Estimators: exact (one backward per basis), finite_difference and forward (forward-mode AD), the last two with
all bases batched together through per-sequence losses. Alignment batches: as large as the training batch (16),
and small (2 sequences per basis, 16 for the target) at m = 64, T_r = 50. The score noise of small alignment
batches is measured after training: the Spearman correlation of each estimate, over 64 bases, with exact scores
on 64 sequences per basis, averaged over 3 fresh draws.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

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
        strategy = DGAStrategy(stream, target=TargetSampler(target_store, SEQ), loss_fn=model.loss,
                               params=list(model.parameters()), eta=0.3, beta=0.1, every=every, batch_size=align,
                               estimator=estimator, module=model, sequence_loss_fn=model.sequence_losses,
                               target_batch_size=BATCH)
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


def round_robin_store(store: ClusterStore, k: int, directory) -> ClusterStore:
    """The store's documents dealt round-robin into k clusters (same tokens, k-cluster layout)."""
    from dgamix.formats import token_store

    if not (directory / token_store.META).exists():
        directory.mkdir(parents=True, exist_ok=True)
        starts, ends = store.doc_offsets[:-1], store.doc_offsets[1:]
        owner = np.arange(len(starts)) % k
        chunks, per_cluster = [], np.bincount(owner, minlength=k)
        for c in range(k):
            docs = np.flatnonzero(owner == c)
            if len(docs):
                chunks.append((np.concatenate([store.tokens[starts[d]:ends[d]] for d in docs]), ends[docs] - starts[docs]))
        token_store.write(directory, chunks, per_cluster, {"vocab_size": store.vocab_size, "eos_id": store.eos_id})
    return ClusterStore(directory)


class Run:
    """One configuration's training state, stepped a round at a time (so configurations can be interleaved)."""

    def __init__(self, kind: str, store: ClusterStore, target_store: ClusterStore, m: int = 0, every: int = 1,
                 rule: str = "anchored"):
        from dgamix.mixer.inbatch import InBatchAlignment
        from dgamix.mixer.strategies import InBatchDGAStrategy

        torch.manual_seed(0)
        self.kind, self.every = kind, every
        mixture = grouped_bases(store, m) if kind == "exact" else Mixture.identity(store.available)
        self.stream = MixtureStream(store, mixture, SEQ, BATCH, seed=0)
        self.model = GPT(GPTConfig(vocab_size=store.vocab_size, block_size=SEQ))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-3)
        target = TargetSampler(target_store, SEQ)
        if kind == "static":
            self.strategy = StaticStrategy(self.stream)
        elif kind == "exact":
            self.strategy = DGAStrategy(self.stream, target=target, loss_fn=self.model.loss,
                                        params=list(self.model.parameters()), eta=0.3, beta=0.1, every=every,
                                        batch_size=BATCH, target_batch_size=BATCH, rule=rule)
        else:
            self.strategy = InBatchDGAStrategy(self.stream, target=target, tracker=InBatchAlignment(self.model),
                                               loss_fn=self.model.loss, every=every, score_every=every,
                                               target_batch_size=BATCH, level="clusters", rule=rule,
                                               eta=0.02 if rule == "paper" else 4.0)
        self.step, self.times = 0, []

    def run(self, steps: int) -> None:
        timed_steps(self, steps)


def timed_steps(run: Any, steps: int) -> None:
    """`steps` training steps of a benchmark run (its stream, model, optimizer and strategy), each timed into
    run.times: the loop every strategy runs, in-batch DGA scoring every `score_every`-th step (its hooks paused on
    the others; training_step and observe are no-ops for the other strategies)."""
    from dgamix.mixer.strategies import Evidence

    for _ in range(steps):
        start = time.perf_counter()
        batch = run.stream.next_batch()
        with run.strategy.training_step(run.step):
            loss = run.model.loss(batch["tokens"])
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        run.strategy.observe(Evidence(batch))
        run.optimizer.step()
        run.strategy.on_step(run.step)
        run.times.append(time.perf_counter() - start)
        run.step += 1


def run_interleaved(configs: dict[str, Any], rounds: int, per_round: int) -> None:
    """Two warm-up steps each (not timed), then `rounds` rounds of `per_round` timed steps per configuration, in
    turn: each round gives every configuration the same machine, so its drift hits them alike."""
    for run in configs.values():
        run.run(2)
        run.times.clear()
    for _ in range(rounds):
        for run in configs.values():
            run.run(per_round)


def inbatch_table(store: ClusterStore, target_store: ClusterStore, rounds: int, per_round: int) -> list[dict]:
    big = round_robin_store(store, 4096, ROOT / "bench/work/store4096")
    configs = {"static (256 clusters)": Run("static", store, target_store),
               "in-batch, 256 clusters, every step": Run("inbatch", store, target_store, every=1),
               "in-batch, 256 clusters, every 10 steps": Run("inbatch", store, target_store, every=10),
               "static (4096 clusters)": Run("static", big, target_store),
               "in-batch, 4096 clusters, every step": Run("inbatch", big, target_store, every=1),
               "in-batch, 4096 clusters, every 10 steps": Run("inbatch", big, target_store, every=10),
               "exact DGA, m = 19, T_r = 20": Run("exact", store, target_store, m=19, every=20),
               "exact DGA, m = 64, T_r = 20": Run("exact", store, target_store, m=64, every=20)}
    run_interleaved(configs, rounds, per_round)
    n_weights = sum(p.numel() for p in configs["static (256 clusters)"].model.parameters())
    rows = []
    for name, run in configs.items():
        base = configs["static (4096 clusters)" if "4096" in name else "static (256 clusters)"]
        # Medians: on a shared machine a step now and then takes several times longer; a refresh of g (every 20
        # steps) or an exact update (every T_r) is then part of the mean, so report both.
        mean, base_mean = float(np.mean(run.times)), float(np.mean(base.times))
        median, base_median = float(np.median(run.times)), float(np.median(base.times))
        # In units of a training step (about 3 forwards): in-batch adds one forward per scored step and the target's
        # forward + backward every T_r = 20 steps; exact DGA adds m + 1 forward + backward passes every T_r steps.
        flops = {"inbatch": (1 / 3) / run.every + 1 / 20, "exact": (run.stream.mixture.n_bases + 1) / run.every,
                 "static": 0.0}[run.kind]
        rows.append({"configuration": name, "s_per_step": mean, "overhead": mean / base_mean - 1,
                     "median_overhead": median / base_median - 1,
                     "flop_model_overhead": flops, "steps": len(run.times)})
    rows.append({"configuration": f"(reference GPT: {n_weights} weights, batch {BATCH} x {SEQ})", "s_per_step": None,
                 "overhead": None, "median_overhead": None, "flop_model_overhead": None, "steps": None})
    return rows


def rules_table(store: ClusterStore, target_store: ClusterStore, rounds: int, per_round: int) -> list[dict]:
    """The anchored rule's cost against the paper's, interleaved in one process: exact DGA at m = 19, T_r = 20
    (the anchored rule cuts every alignment batch in two halves: the same sequences, twice the backward calls, plus
    two dot products per basis) and in-batch DGA over the 256 clusters, every step (the refresh computes two half
    target gradients instead of one whole)."""
    configs = {"static": Run("static", store, target_store)}
    for rule in ("paper", "anchored"):
        configs[f"exact DGA, m = 19, T_r = 20, {rule}"] = Run("exact", store, target_store, m=19, every=20, rule=rule)
        configs[f"in-batch, 256 clusters, every step, {rule}"] = Run("inbatch", store, target_store, rule=rule)
    run_interleaved(configs, rounds, per_round)
    base = float(np.mean(configs["static"].times))
    return [{"configuration": name, "s_per_step": float(np.mean(run.times)),
             "overhead": float(np.mean(run.times)) / base - 1,
             "median_overhead": float(np.median(run.times)) / float(np.median(configs["static"].times)) - 1,
             "steps": len(run.times)} for name, run in configs.items()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--inbatch", action="store_true", help="only the in-batch table (interleaved runs)")
    parser.add_argument("--rules", action="store_true", help="only the anchored against the paper's rule (interleaved)")
    parser.add_argument("--tokens", default="data/tokens", help="--rules: the token store (relative to the project)")
    parser.add_argument("--target", default="data/targets/spec/tokens", help="--rules: the target's store")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=10)
    args = parser.parse_args()
    if args.rules:
        torch.set_num_threads(1)
        rows = rules_table(ClusterStore(ROOT / args.tokens), ClusterStore(ROOT / args.target), args.rounds,
                           args.per_round)
        print_table(rows)
        print("wrote", write_result("dga_overhead_rules", rows, {"args": vars(args)}))
        return
    if args.inbatch:
        torch.set_num_threads(1)
        store = ClusterStore(ROOT / "data/tokens")
        rows = inbatch_table(store, ClusterStore(ROOT / "data/targets/spec/tokens"), args.rounds, args.per_round)
        print_table(rows)
        print("wrote", write_result("dga_overhead_inbatch", rows, {"args": vars(args)}))
        return
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
