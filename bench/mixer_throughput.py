"""Mixer throughput and memory: 4096 clusters, a random cluster per sequence, seq len 1024, batch 32.

    .venv/bin/pip install -e '.[bench]'    # HF datasets, for the interleave_datasets peer
    .venv/bin/python bench/mixer_throughput.py [--tokens-per-cluster 20000] [--steps 300] [--repeats 3]

Rows (same token store, same cluster probabilities, one process, torch on 1 thread):
- dgamix MixtureStream, identity bases over 4096 clusters, weights changing every 10 steps (Dirichlet draws);
- dgamix MixtureStream with fixed weights;
- dgamix MixtureLoader (planned in the main process, read by 0, 2 and 4 DataLoader workers), weights changing every
  10 steps: the path for trainers with workers (the weights reach every planned batch). With workers, three
  transports side by side: the loader's own (each batch by value through the worker's pipe, the tokens in the
  store's uint16, widened to int64 in the main process), the same with `widen=False` (uint16 tokens handed out, for
  a loop that widens them on the device), and the previous one (int64 tensors through torch's shared-memory
  queues, what a plain DataLoader over the loader's parts does, as a trainer that rebuilds it);
- torch WeightedRandomSampler over the concatenation of every cluster's fixed 1025-token chunks (fixed weights:
  the sampler cannot change them mid-run), batched by a DataLoader;
- HF datasets.interleave_datasets over one in-memory Dataset per cluster (fixed probabilities), read in batches.
Each row is the median of --repeats runs, the rows taken in turn (round-robin), so that a busy machine slows
them alike, with the CPU time per batch of the main process and of the workers. Memory (--skip-memory: none): the
stream runs in a fresh subprocess per corpus size (1x and 4x tokens per cluster) and reports peak RSS and anonymous
RSS (file-backed mmap pages are shared and evictable; anonymous memory is what must stay flat).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import WORK, print_table, write_result

SEQ_LEN = 1024
BATCH = 32
CLUSTERS = 4096


def build_store(directory: Path, tokens_per_cluster: int, seed: int = 0) -> Path:
    """A synthetic store: every cluster holds documents of 200-2000 random tokens, EOS-terminated."""
    from dgamix.formats import token_store

    if (directory / "store.json").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lengths = []
    for _ in range(CLUSTERS):
        draws = rng.integers(200, 2000, size=2 * tokens_per_cluster // 200 + 2)
        lengths.append(draws[: int(np.searchsorted(np.cumsum(draws), tokens_per_cluster)) + 1].astype(np.int64))

    def chunks():
        token_rng = np.random.default_rng(seed + 1)
        for cluster_lengths in lengths:
            tokens = token_rng.integers(1, 32000, size=int(cluster_lengths.sum()), dtype=np.uint16)
            tokens[np.cumsum(cluster_lengths) - 1] = 0
            yield tokens, cluster_lengths

    token_store.write(directory, chunks(), np.array([len(x) for x in lengths]), {"vocab_size": 32000, "eos_id": 0})
    return directory


def run_stream(directory: Path, steps: int, change_every: int | None) -> dict:
    from dgamix.mixer import ClusterStore, Mixture, MixtureStream

    store = ClusterStore(directory)
    stream = MixtureStream(store, Mixture.identity(store.available), SEQ_LEN, BATCH, seed=0)
    rng = np.random.default_rng(1)
    n_tokens = 0
    start, cpu = time.perf_counter(), _cpu()
    for step in range(steps):
        if change_every and step % change_every == 0:
            stream.set_weights(rng.dirichlet(np.ones(store.n_clusters)))
        n_tokens += stream.next_batch()["tokens"].numel()
    return {"tokens_per_s": n_tokens / (time.perf_counter() - start), "steps": steps, **_cpu_per_batch(cpu, steps)}


def _cpu() -> tuple[float, float]:
    """(this process's CPU seconds, its finished children's: the DataLoader workers, once joined)."""
    times = os.times()
    return times.user + times.system, times.children_user + times.children_system


def _cpu_per_batch(before: tuple[float, float], steps: int) -> dict:
    # The main process's CPU per batch is what the data costs the training loop itself (which shares that process
    # with the data's planning, and its reading in-process); the workers' is what the machine pays besides.
    main, workers = (now - then for now, then in zip(_cpu(), before))
    return {"main_cpu_ms_per_batch": 1e3 * main / steps, "worker_cpu_ms_per_batch": 1e3 * workers / steps}


TRANSPORTS = {
    "by value": "uint16 by value through the pipe, widened to int64 here",
    "narrow": "widen=False: uint16 handed out",
    "int64 queues": "int64 tensors through shared-memory queues (before)",
}


def run_loader(directory: Path, steps: int, workers: int, change_every: int = 10,
               transport: str = "by value") -> dict:
    from torch.utils.data import DataLoader

    from dgamix.mixer import ClusterStore, Mixture, MixtureLoader, MixtureStream

    store = ClusterStore(directory)
    stream = MixtureStream(store, Mixture.identity(store.available), SEQ_LEN, BATCH, seed=0, max_steps=steps)
    loader = MixtureLoader(stream, num_workers=workers, widen=transport != "narrow")
    if transport == "int64 queues":
        # The loader's parts in a plain DataLoader (as accelerate rebuilds it): its workers collate whole int64
        # batches and torch sends each tensor through shared memory.
        loader = DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn,
                            num_workers=workers, generator=loader.generator)
    rng = np.random.default_rng(1)
    n_tokens = 0
    start, cpu = time.perf_counter(), _cpu()  # includes starting the workers, as a trainer's first epoch does
    for step, batch in enumerate(loader):
        if step % change_every == 0:
            stream.set_weights(rng.dirichlet(np.ones(store.n_clusters)))
        n_tokens += batch["tokens"].numel()
    # (the iteration's end joined the workers: their CPU time is counted)
    return {"tokens_per_s": n_tokens / (time.perf_counter() - start), "steps": steps, **_cpu_per_batch(cpu, steps)}


def run_weighted_sampler(directory: Path, steps: int) -> dict:
    import torch
    from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

    from dgamix.mixer import ClusterStore

    store = ClusterStore(directory)
    per_cluster = store.cluster_tokens // (SEQ_LEN + 1)
    starts = [store.doc_offsets[store.cluster_offsets[c]] + np.arange(n) * (SEQ_LEN + 1)
              for c, n in enumerate(per_cluster)]
    offsets = np.concatenate(starts)
    p = np.random.default_rng(1).dirichlet(np.ones(CLUSTERS))
    weights = np.repeat(p / np.maximum(per_cluster, 1), per_cluster)

    class Chunks(Dataset):
        def __len__(self):
            return len(offsets)

        def __getitem__(self, i):
            return torch.from_numpy(store.tokens[offsets[i] : offsets[i] + SEQ_LEN + 1].astype(np.int64))

    sampler = WeightedRandomSampler(torch.from_numpy(weights), num_samples=steps * BATCH, replacement=True,
                                    generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    n_tokens = sum(batch.numel() for batch in DataLoader(Chunks(), batch_size=BATCH, sampler=sampler))
    return {"tokens_per_s": n_tokens / (time.perf_counter() - start), "steps": steps}


def run_interleave(directory: Path, steps: int) -> dict:
    """HF datasets' streaming mixture: one IterableDataset per cluster, interleaved with fixed probabilities.

    (Map-style interleave_datasets precomputes its whole index: with 4096 Dirichlet probabilities and
    stopping_strategy="all_exhausted" it did not finish within 15 minutes and took 8.7 GB, so the streaming form,
    the one meant for mixtures, is the peer.)
    """
    from datasets import Dataset, interleave_datasets

    from dgamix.mixer import ClusterStore

    store = ClusterStore(directory)
    build = time.perf_counter()
    parts = []
    for c in range(CLUSTERS):
        begin, end = store.doc_offsets[store.cluster_offsets[c]], store.doc_offsets[store.cluster_offsets[c + 1]]
        n = (end - begin) // (SEQ_LEN + 1)
        rows = np.asarray(store.tokens[begin : begin + n * (SEQ_LEN + 1)]).reshape(n, SEQ_LEN + 1)
        parts.append(Dataset.from_dict({"tokens": rows}).to_iterable_dataset())
    p = np.random.default_rng(1).dirichlet(np.ones(CLUSTERS))
    mixed = interleave_datasets(parts, probabilities=p.tolist(), seed=0, stopping_strategy="first_exhausted")
    mixed = mixed.with_format("numpy")
    build_s = time.perf_counter() - build
    start = time.perf_counter()
    n_tokens, batches = 0, 0
    for batch in mixed.iter(batch_size=BATCH):
        n_tokens += batch["tokens"].size
        batches += 1
        if batches == steps:
            break
    return {"tokens_per_s": n_tokens / (time.perf_counter() - start), "steps": batches, "build_s": build_s}


def memory_probe(directory: str, steps: int) -> None:
    """Run in a subprocess: stream `steps` batches, print peak RSS and anonymous RSS in MiB as JSON."""
    import resource

    run_stream(Path(directory), steps, 10)
    status = Path("/proc/self/status").read_text()
    anon = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("RssAnon")), -1)
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_anon_mib": anon / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens-per-cluster", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--memory-probe", nargs=2, metavar=("STORE", "STEPS"))
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 2, 4], help="MixtureLoader rows")
    parser.add_argument("--skip-peers", action="store_true", help="only the dgamix rows")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row (the median is reported)")
    parser.add_argument("--skip-memory", action="store_true", help="only the throughput rows")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    if args.memory_probe:
        memory_probe(args.memory_probe[0], int(args.memory_probe[1]))
        return
    small = build_store(WORK / f"mixer_store_{args.tokens_per_cluster}", args.tokens_per_cluster)
    runs = [
        ("dgamix MixtureStream, weights change every 10 steps", lambda: run_stream(small, args.steps, 10)),
        ("dgamix MixtureStream, fixed weights", lambda: run_stream(small, args.steps, None)),
        *[(f"dgamix MixtureLoader, {w} workers" + (f", {TRANSPORTS[t]}" if w else "")
           + ", weights change every 10 steps", lambda w=w, t=t: run_loader(small, args.steps, w, transport=t))
          for w in args.workers for t in (TRANSPORTS if w else ["by value"])],
        *([] if args.skip_peers else [
            ("torch WeightedRandomSampler + DataLoader (fixed)", lambda: run_weighted_sampler(small, args.steps)),
            ("HF datasets.interleave_datasets (fixed)", lambda: run_interleave(small, args.steps))]),
    ]
    results: dict[str, list[dict]] = {name: [] for name, _ in runs}
    for repeat in range(args.repeats):
        for name, fn in runs:
            if name.startswith("HF") and repeat:  # minutes to build each time; its rate is orders of magnitude off
                continue
            try:
                result = fn()
            except ImportError as err:
                result = {"tokens_per_s": float("nan"), "steps": 0, "error": str(err)}
            results[name].append(result)
            print_table([{"method": name, "repeat": repeat, **result}])
    rows = []
    for name, _ in runs:
        rates = [r["tokens_per_s"] for r in results[name]]
        medians = {key: float(np.median([r[key] for r in results[name]])) for key in results[name][0]
                   if key.endswith("_per_batch")}
        rows.append({"method": name, **results[name][0], "tokens_per_s": float(np.median(rates)), **medians,
                     "runs_tokens_per_s": rates})
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["ratio_to_dgamix_changing"] = row["tokens_per_s"] / base
    memory = []
    for directory in () if args.skip_memory else (
            small, build_store(WORK / f"mixer_store_{4 * args.tokens_per_cluster}", 4 * args.tokens_per_cluster)):
        probe = subprocess.run([sys.executable, __file__, "--memory-probe", str(directory), str(args.steps)],
                               capture_output=True, text=True, check=True)
        tokens = json.loads((directory / "store.json").read_text())["tokens"]
        memory.append({"store_tokens": tokens, **json.loads(probe.stdout.strip().splitlines()[-1])})
    print()
    print_table(rows)
    print()
    print_table(memory)
    print("wrote", write_result("mixer_throughput", rows, {"memory": memory, "args": vars(args)}))


if __name__ == "__main__":
    main()
