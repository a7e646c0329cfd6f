"""GPU check: DGA updates under an NCCL process group on CUDA (one rank), printing PASS or FAIL per check.

    .venv/bin/python bench/gpu_nccl_check.py                          # CUDA + NCCL (exits 0 with a message if no GPU)
    .venv/bin/python bench/gpu_nccl_check.py --device cpu --backend gloo   # the same code path on CPU, as a dry run

An NCCL process group has no CPU path: every collective the mixer runs (the target gradient, the partial alignment
scores, the in-batch statistics) must use CUDA tensors. A world of one rank is enough to exercise them: the
collectives run for real, through NCCL, and the scores must equal those of the same model with no process group.
Checks: DGAStrategy with the exact, finite-difference and forward estimators (scores equal to the no-process-group
scores, weights moved), then InBatchDGAStrategy (target refresh and statistics merge through NCCL, weights moved).
Exit status 0 when every check passes (or no CUDA device), 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from dgamix.formats import token_store
from dgamix.mixer import ClusterStore, Mixture, MixtureStream, TargetSampler
from dgamix.mixer.inbatch import InBatchAlignment
from dgamix.mixer.strategies import DGAStrategy, Evidence, InBatchDGAStrategy

VOCAB, SEQ_LEN = 64, 16


def synthetic_store(directory: Path, docs_per_cluster: list[int], seed: int) -> Path:
    """Cluster c's documents hold tokens in [c*10+1, c*10+9], EOS = 0 (as the tests' fixture)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    chunks = []
    for cluster, n_docs in enumerate(docs_per_cluster):
        lengths = rng.integers(5, 60, size=n_docs) + 1
        tokens = np.concatenate([np.r_[rng.integers(cluster * 10 + 1, cluster * 10 + 10, size=n - 1), 0]
                                 for n in lengths]).astype(np.uint16)
        chunks.append((tokens, lengths.astype(np.int64)))
    token_store.write(directory, chunks, np.array(docs_per_cluster), {"vocab_size": 1000, "eos_id": 0})
    return directory


class Setup:
    def __init__(self, root: Path, device: torch.device):
        self.tokens = synthetic_store(root / "tokens", [30, 20, 10, 25], seed=0)
        self.target = synthetic_store(root / "target", [12], seed=5)
        self.device = device

    def stream(self) -> MixtureStream:
        mixture = Mixture(np.stack([np.r_[0.5, 0.5, 0, 0], np.r_[0.1, 0.2, 0.3, 0.4], np.r_[0, 0, 0.5, 0.5]]))
        return MixtureStream(ClusterStore(self.tokens, seed=1), mixture, seq_len=SEQ_LEN, batch_size=4, seed=7)

    def model(self) -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Embedding(VOCAB, 32), torch.nn.Linear(32, VOCAB)).to(self.device)

    def losses(self, model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.device)
        logits = model(tokens[:, :-1])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1),
                                                 reduction="none").view(len(tokens), -1).mean(dim=1)

    def dga_scores(self, estimator: str) -> tuple[np.ndarray, list[float], list[float]]:
        """Scores of one update, and the weights before and after it."""
        model, stream = self.model(), self.stream()
        dga = DGAStrategy(stream, target=TargetSampler(ClusterStore(self.target), SEQ_LEN),
                          loss_fn=lambda t: self.losses(model, t).mean(), params=list(model.parameters()),
                          estimator=estimator, eta=5.0, every=1, batch_size=4, module=model,
                          sequence_loss_fn=lambda t: self.losses(model, t))
        before = stream.weights.tolist()
        record = dga.on_step(0)
        return np.asarray(record.scores), before, stream.weights.tolist()

    def inbatch_weights(self) -> tuple[list[float], list[float], int]:
        model, stream = self.model(), self.stream()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        dga = InBatchDGAStrategy(stream, target=TargetSampler(ClusterStore(self.target), SEQ_LEN),
                                 tracker=InBatchAlignment(model), loss_fn=lambda t: self.losses(model, t).mean(),
                                 eta=0.5, every=2, refresh=2, min_sequences=1, target_batch_size=4)
        before = stream.weights.tolist()
        for step in range(4):
            batch = stream.next_batch()
            optimizer.zero_grad()
            self.losses(model, batch["tokens"]).mean().backward()
            dga.observe(Evidence(batch))
            optimizer.step()
            dga.on_step(step)
        return before, stream.weights.tolist(), dga.updates


def check(name: str, fn: Callable[[], str | None]) -> bool:
    """Runs fn; it returns None on success or a reason for failure."""
    try:
        reason = fn()
    except Exception:  # a check that raises has failed; the traceback says why
        traceback.print_exc()
        reason = "raised (traceback above)"
    print(f"{'PASS' if reason is None else 'FAIL'}  {name}{'' if reason is None else ': ' + reason}", flush=True)
    return reason is None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="nccl")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        setup = Setup(Path(tmp), device)
        estimators = ("exact", "finite_difference", "forward")
        reference = {e: setup.dga_scores(e)[0] for e in estimators}  # no process group: nothing reduced
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        dist.init_process_group(args.backend, rank=0, world_size=1)
        print(f"torch {torch.__version__}, backend {dist.get_backend()}, device {device}"
              f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}", flush=True)
        results = []
        try:
            for estimator in estimators:
                def dga_check(estimator: str = estimator) -> str | None:
                    scores, before, after = setup.dga_scores(estimator)
                    rtol = 1e-3 if estimator == "finite_difference" else 1e-5
                    if not np.allclose(scores, reference[estimator], rtol=rtol, atol=1e-8):
                        return f"scores {scores} differ from the no-process-group scores {reference[estimator]}"
                    return None if before != after else "the weights did not move"
                results.append(check(f"DGAStrategy estimator={estimator} under {args.backend}", dga_check))

            def inbatch_check() -> str | None:
                before, after, updates = setup.inbatch_weights()
                if updates != 2:
                    return f"{updates} updates, expected 2"
                return None if before != after and np.isfinite(after).all() else f"weights {after} (from {before})"
            results.append(check(f"InBatchDGAStrategy under {args.backend}", inbatch_check))
        finally:
            dist.destroy_process_group()
    print("PASS" if all(results) else "FAIL")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
