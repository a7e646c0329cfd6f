"""Reference training run: the small GPT on the mixer stream under one strategy, with evaluation and resume.

`dgamix train --strategy NAME` (what dvc.yaml's foreach calls) reads the `train` section of params.yaml.
Strategies: uniform (over the bases), natural, importance (static weight 1 on the importance basis), dga (no EMA),
dga_ema, and odm (the EXP3 bandit of Online Data Mixing over disjoint domains: the coarse bases when the bases
stage built them, else one domain per cluster). Outputs in runs/NAME/: metrics.json (final and best losses),
log.csv (per step: train loss, evaluation losses when measured, weights `w:`, alignment scores `a:`, tokens drawn
per basis `t:` (a sequence's tokens split over the bases in proportion to alpha_j P_j(cluster)), skipped updates),
clusters.parquet (step, cluster, tokens: what was drawn), checkpoint.pt (resumed when present).

Evaluation: the specialized loss on the target's held-out eval set (bases stage, `target_eval/`), and the generic
loss on the held-out generic documents (tokenize stage, `heldout/`), which training never reads.
"""
from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..mixer import ClusterStore, Mixture, MixtureStream, TargetSampler
from ..mixer.strategies import DGAStrategy, ODMStrategy, StaticStrategy
from ..core.atomic import atomic_path, write_json
from ..core.params import ParamError, local_path, positive_int, require, section

from .model import GPT, GPTConfig

log = logging.getLogger(__name__)
STRATEGIES = ("uniform", "natural", "importance", "dga", "dga_ema", "odm")


def resolve_device() -> tuple[str, torch.dtype | None]:
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16
    return "cpu", None


def eval_sampler(directory: Path, param: str, seq_len: int, seed: int) -> TargetSampler:
    if not (directory / "store.json").exists():
        raise ParamError(f"no held-out evaluation store at {directory}: set {param} (and re-run that stage) so the "
                         "trainer can report a held-out loss")
    return TargetSampler(ClusterStore(directory, seed=seed + 1), seq_len)


def fixed_eval_set(sampler_draw, n_batches: int) -> list[torch.Tensor]:
    return [sampler_draw() for _ in range(n_batches)]


@torch.no_grad()
def evaluate(model: GPT, batches: list[torch.Tensor], device: str, autocast: torch.dtype | None) -> float:
    model.eval()
    losses = []
    for tokens in batches:
        with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
            losses.append(float(model.loss(tokens.to(device))))
    model.train()
    return float(np.mean(losses))


def domain_mixture(mixture: Mixture, store: ClusterStore) -> Mixture:
    """ODM needs disjoint domains: the coarse bases when present, else one domain per cluster."""
    coarse = [n for n in mixture.names if n.startswith("coarse:")]
    return mixture.select(coarse) if coarse else Mixture.identity(store.available)


def build_strategy(name: str, stream: MixtureStream, target: TargetSampler, model: GPT, cfg: dict[str, Any],
                   device: str) -> StaticStrategy | DGAStrategy | ODMStrategy:
    if name == "odm":
        return ODMStrategy(stream)
    if name == "uniform":
        return StaticStrategy(stream)
    if name in ("natural", "importance"):
        return StaticStrategy(stream, basis=name)
    if name in ("dga", "dga_ema"):
        loss_fn = lambda tokens: model.loss(tokens.to(device))  # noqa: E731
        sequence_loss_fn = lambda tokens: model.sequence_losses(tokens.to(device))  # noqa: E731
        try:
            return DGAStrategy(stream, target, loss_fn, [p for p in model.parameters() if p.requires_grad],
                               eta=float(cfg.get("eta", 0.3)),
                               beta=1.0 if name == "dga" else float(cfg.get("beta", 0.1)),
                               every=int(cfg.get("every", 20)), batch_size=int(cfg.get("dga_batch_size", 8)),
                               target_batch_size=(positive_int(cfg, "train", "dga_target_batch_size", 1)
                                                  if cfg.get("dga_target_batch_size") is not None else None),
                               estimator=str(cfg.get("estimator", "exact")), module=model,
                               sequence_loss_fn=sequence_loss_fn)
        except ValueError as err:
            raise ParamError(f"train: {err}") from err
    raise ParamError(f"train.strategy = '{name}': expected one of {list(STRATEGIES)}")


def run(params: dict[str, Any], strategy_name: str) -> dict[str, Any]:
    cfg = section(params, "train")
    if strategy_name not in STRATEGIES:
        raise ParamError(f"train.strategy = '{strategy_name}': expected one of {list(STRATEGIES)}")
    steps = positive_int(cfg, "train", "steps", 200)
    seq_len = positive_int(cfg, "train", "seq_len", 64)
    batch_size = positive_int(cfg, "train", "batch_size", 16)
    eval_every = positive_int(cfg, "train", "eval_every", 50)
    eval_batches = positive_int(cfg, "train", "eval_batches", 4)
    checkpoint_every = positive_int(cfg, "train", "checkpoint_every", 100)
    seed = require(cfg, "train", "seed", int, 0)
    lr = float(require(cfg, "train", "lr", (int, float), 3e-3))
    token_cap = require(cfg, "train", "token_cap", int, None)
    tokens_dir = local_path(cfg, "train", "tokens", "data/tokens")
    bases_dir = local_path(cfg, "train", "bases", "data/bases")
    out_dir = local_path(cfg, "train", "output", "runs") / strategy_name
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    device, autocast = resolve_device()

    store = ClusterStore(tokens_dir, token_cap=token_cap, seed=seed)
    mixture = Mixture.from_bases_dir(bases_dir, require(cfg, "train", "basis_names", list, None))
    if strategy_name == "odm":
        mixture = domain_mixture(mixture, store)
    stream = MixtureStream(store, mixture, seq_len, batch_size, seed=seed)
    target = TargetSampler(ClusterStore(bases_dir / "target", seed=seed), seq_len)
    model = GPT(GPTConfig(vocab_size=store.vocab_size, block_size=seq_len,
                          n_layer=int(cfg.get("n_layer", 2)), n_head=int(cfg.get("n_head", 4)),
                          n_embd=int(cfg.get("n_embd", 128)))).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    strategy = build_strategy(strategy_name, stream, target, model, cfg, device)

    # Fixed evaluation sets, drawn once: the held-out specialized set and the held-out generic documents.
    spec_eval = eval_sampler(bases_dir / "target_eval", "bases.eval", seq_len, seed)
    spec_batches = fixed_eval_set(lambda: spec_eval.sample(batch_size), eval_batches)
    generic_eval = eval_sampler(tokens_dir / "heldout", "tokenize.holdout_fraction", seq_len, seed)
    generic_batches = fixed_eval_set(lambda: generic_eval.sample(batch_size), eval_batches)

    checkpoint = out_dir / "checkpoint.pt"
    start_step, rows, drawn = 0, [], []
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        stream.load_state_dict(state["stream"])
        strategy.load_state_dict(state["strategy"])
        start_step, rows, drawn = state["step"], state["rows"], state["drawn"]
        log.info("train %s: resumed at step %d", strategy_name, start_step)

    started = time.perf_counter()
    drawn: list[tuple[int, dict[int, int]]] = []
    for step in range(start_step, steps):
        batch = stream.next_batch()
        tokens = batch["tokens"].to(device)
        with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
            losses = model.sequence_losses(tokens)
            loss = losses.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if isinstance(strategy, ODMStrategy):  # rewarded by each domain's training loss
            strategy.observe(batch["cluster"].numpy(), losses.detach().float().cpu().numpy())
        log_entry = stream.last_log
        update = strategy.on_step(step)
        row: dict[str, Any] = {"step": step, "train_loss": float(loss.detach()),
                               "weights": stream.weights.round(6).tolist(),
                               "tokens": tokens_per_basis(mixture, log_entry.weights, log_entry.tokens_per_cluster)}
        drawn.append((step, log_entry.tokens_per_cluster))
        if update is not None:
            row.update(scores=np.round(update.scores, 8).tolist(), skipped=update.skipped)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            row["spec_loss"] = evaluate(model, spec_batches, device, autocast)
            row["generic_loss"] = evaluate(model, generic_batches, device, autocast)
            log.info("train %s: step %d spec %.4f generic %.4f", strategy_name, step + 1, row["spec_loss"],
                     row["generic_loss"])
        rows.append(row)
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            with atomic_path(checkpoint) as tmp:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "stream": stream.state_dict(), "strategy": strategy.state_dict(),
                            "step": step + 1, "rows": rows, "drawn": drawn}, tmp)

    evals = [r for r in rows if "spec_loss" in r]
    metrics = {"strategy": strategy_name, "steps": steps, "final_spec_loss": evals[-1]["spec_loss"],
               "final_generic_loss": evals[-1]["generic_loss"], "best_spec_loss": min(r["spec_loss"] for r in evals),
               "seconds": time.perf_counter() - started, "parameters": model.num_params(),
               "bases": mixture.names, "final_weights": stream.weights.tolist(),
               "skipped_updates": sum(1 for r in rows if r.get("skipped")),
               "generic_eval": "held-out generic documents (tokenize.holdout_fraction)",
               "clusters_repeated": int((stream.passes_completed() > 0).sum())}
    write_log(rows, mixture.names, out_dir / "log.csv")
    write_drawn(drawn, out_dir / "clusters.parquet")
    write_json(metrics, out_dir / "metrics.json")
    checkpoint.unlink(missing_ok=True)  # the run is complete; its outputs are the record
    return metrics


def tokens_per_basis(mixture: Mixture, weights: np.ndarray, tokens_per_cluster: dict[int, int]) -> list[float]:
    """Pure: a batch's tokens attributed to the bases, each cluster's tokens split in proportion to alpha_j P_j(c)
    (which basis "sent" them, in expectation). Sums to the batch's tokens."""
    clusters = np.fromiter(tokens_per_cluster, dtype=np.int64)
    counts = np.fromiter(tokens_per_cluster.values(), dtype=np.float64)
    share = mixture.bases[:, clusters].toarray() * np.asarray(weights)[:, None]  # (m, clusters in the batch)
    share /= share.sum(axis=0, keepdims=True)
    return np.round(share @ counts, 3).tolist()


def write_drawn(drawn: list[tuple[int, dict[int, int]]], path: Path) -> None:
    steps = [step for step, per_cluster in drawn for _ in per_cluster]
    clusters = [c for _, per_cluster in drawn for c in per_cluster]
    tokens = [t for _, per_cluster in drawn for t in per_cluster.values()]
    with atomic_path(path) as tmp:
        pq.write_table(pa.table({"step": pa.array(steps, pa.int32()), "cluster": pa.array(clusters, pa.int32()),
                                 "tokens": pa.array(tokens, pa.int64())}), tmp)


def write_log(rows: list[dict[str, Any]], names: list[str], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "train_loss", "spec_loss", "generic_loss", "skipped"]
                        + [f"w:{n}" for n in names] + [f"a:{n}" for n in names] + [f"t:{n}" for n in names])
        for r in rows:
            scores = r.get("scores", [""] * len(names))
            writer.writerow([r["step"], r["train_loss"], r.get("spec_loss", ""), r.get("generic_loss", ""),
                             r.get("skipped", "")] + r["weights"] + scores + r["tokens"])
