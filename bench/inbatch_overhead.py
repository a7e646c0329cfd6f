"""In-batch alignment overhead: wall time of a training step alone, with exact per-sequence scores, with the output
head's term at rank 8 (the default size threshold), and with every Linear at rank 8, on the reference GPT at the
trainer's defaults or a Hugging Face causal LM of the same size.

    .venv/bin/python bench/inbatch_overhead.py [--model gpt] [--steps 20] [--warmup 5] [--threads 2]
    # writes bench/results/inbatch_overhead.json (inbatch_overhead_<n>thread.json for --threads n != 2;
    # inbatch_overhead_<model>[_<n>thread].json for --model gpt2 | llama | gpt_neox)

Reference GPT (trainer/model.py defaults: 2 layers, 128 wide, 4 heads, vocabulary 8192), or with --model the
transformers model of that size built from a config (`build_model`: GPT-2 with its Conv1D layers and tied head,
Llama with RMSNorm, rotary positions and an untied head, GPT-NeoX; default attention implementation, no dropout,
its own loss, `model(input_ids=x, labels=x).loss`); batch 16 x 64 tokens of
random ids, AdamW, CPU with `--threads` torch threads. Three identical models (same seed, same batches) train side
by side, one step of each mode in turn, so machine noise falls on every mode alike; tracking never changes the
training, so the three stay bit-identical and the low-rank scores are compared with the exact ones on the very same
parameters and sequences (Spearman over all scored sequences). A step is zero_grad + forward + backward (+ collect)
+ optimizer.step; the target gradient and its factors are refreshed outside the timed part (reported apart: once
per T_r steps; the second, warm refresh is reported). `terms_*`: the time spent in the per-layer dot products inside
the backward, measured in place (TimedTracker), per step. Medians over `--steps` steps after `--warmup`, and minima,
of wall time, and medians of the process's CPU time (both torch threads); `paired_overhead_pct` is the median over
steps of each step's time against the plain step of the same round (adjacent in time, so under the same load; the
order of the modes rotates every round). On a shared machine the wall-time median carries other jobs' load (the
load average is printed and saved); the paired ratio and the minimum are closer to what the work itself costs.

FLOP model (multiply-adds x 2): forward ~ 2 * params * tokens (the brief's rule), or per Linear 2 * B*T * d_in *
d_out plus attention 4 * B * T^2 * D per layer; a training step ~ 3 forwards. Exact tracking adds, per Linear,
2 * B*T * d_in * d_out (one more matmul of the layer's size) and O(B*T*D) for embeddings, LayerNorms and biases;
at rank r a Linear's term costs 2 * B*T * r * (d_in + d_out) instead.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch

from common import print_table, write_result

from dgamix.mixer.inbatch import InBatchAlignment, mean_loss_scale
from dgamix.trainer.model import GPT, GPTConfig

BATCH, SEQ, VOCAB, RANK = 16, 64, 8192, 8
MODELS = ("gpt", "gpt2", "llama", "gpt_neox")
# rank8_head: the default size threshold picks the output head only; rank8_all: every Linear at rank 8;
# exact_noise: exact, plus the second dot product along the noise direction h that anchored in-batch DGA sets
# (`set_target(g, noise=h)`: its standard errors count the noise of g_spe).
MODES = ("train", "exact", "exact_noise", f"rank{RANK}_head", f"rank{RANK}_all")
TRACKER_OPTIONS = {"exact": {}, "exact_noise": {}, f"rank{RANK}_head": {"rank": RANK},
                   f"rank{RANK}_all": {"rank": RANK, "low_rank_min_params": 0}}


class TimedTracker(InBatchAlignment):
    """Times the per-layer dot products inside the backward (the tracker's `_term`): the work tracking adds, apart
    from the hook plumbing; its minimum over steps is what the machine's load hides least."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.spent = 0.0

    def _term(self, tap, saved, delta, *blocks_and_factors):
        start = time.perf_counter()
        term = super()._term(tap, saved, delta, *blocks_and_factors)
        self.spent += time.perf_counter() - start
        return term


def build_model(name: str, vocab: int = VOCAB, seq: int = SEQ, width: int = 128, layers: int = 2,
                heads: int = 4) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """(model, loss of a (B, seq + 1) token batch): the reference GPT, or a transformers causal LM of the same size
    (MLP 4 x wide, no dropout) whose own loss shifts the labels and averages over the predicted tokens. The
    caller seeds torch first."""
    if name == "gpt":
        model = GPT(GPTConfig(vocab_size=vocab, block_size=seq, n_layer=layers, n_head=heads, n_embd=width))
        return model, model.loss
    import transformers  # only for the Hugging Face models

    common = {"vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0}
    if name == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_positions=2 * seq, n_embd=width, n_layer=layers, n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, **common))
    elif name == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads,
            max_position_embeddings=2 * seq, **common))
    elif name == "gpt_neox":
        model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads,
            max_position_embeddings=2 * seq, attention_dropout=0.0, hidden_dropout=0.0, **common))
    else:
        raise ValueError(f"model = {name!r}: expected one of {', '.join(MODELS)}")

    def loss(tokens: torch.Tensor) -> torch.Tensor:
        return model(input_ids=tokens, labels=tokens).loss
    return model, loss


def _matrices(model: torch.nn.Module) -> list[tuple[int, int]]:
    """(d_in, d_out) of every Linear and transformers Conv1D (whose weight is (in, out))."""
    shapes = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            shapes.append((module.in_features, module.out_features))
        elif type(module).__name__ == "Conv1D":
            shapes.append(tuple(module.weight.shape))
    return shapes


def flop_model(model: torch.nn.Module, tokens: int, seq: int, width: int, layers: int,
               vocab: int) -> dict[str, float]:
    linears = _matrices(model)
    params = sum(p.numel() for p in model.parameters())  # a tied weight once
    forward = 2 * tokens * sum(i * o for i, o in linears) + 4 * tokens * seq * width * layers
    exact = 2 * tokens * sum(i * o for i, o in linears)
    head = 2 * tokens * width * vocab
    low_head = exact - head + 2 * tokens * RANK * (width + vocab)
    low_all = 2 * tokens * sum(min(RANK, i, o) * (i + o) for i, o in linears)
    step = 3 * forward
    return {"forward_rule_2_params_tokens": 2 * params * tokens, "forward": forward,
            "train_step": step, "exact_tracking": exact, f"rank{RANK}_head_tracking": low_head,
            f"rank{RANK}_all_tracking": low_all}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", choices=MODELS, default="gpt")
    parser.add_argument("--name", default=None, help="result file name (default: from --model and --threads)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    models, optimizers, trackers, losses = {}, {}, {}, {}
    for mode in MODES:
        torch.manual_seed(0)
        models[mode], losses[mode] = build_model(args.model)
        optimizers[mode] = torch.optim.AdamW(models[mode].parameters(), lr=3e-3)
        if mode != "train":
            trackers[mode] = TimedTracker(models[mode], **TRACKER_OPTIONS[mode])
    gen = torch.Generator().manual_seed(0)
    target = [torch.randint(0, VOCAB // 2, (BATCH, SEQ + 1), generator=gen)]  # a "specialized" half of the ids
    refresh: dict[str, list[float]] = {mode: [] for mode in trackers}
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
    terms: dict[str, list[float]] = {mode: [] for mode in trackers}
    scores: dict[str, list[torch.Tensor]] = {mode: [] for mode in trackers}
    total = args.warmup + args.steps
    for step in range(total):
        if step in (0, total // 2):  # T_r: refreshed twice, outside the timed step
            for mode, tracker in trackers.items():
                start = time.perf_counter()
                g = tracker.refresh_target(losses[mode], target)
                if mode == "exact_noise":  # any dense direction costs the same; in-batch DGA's is (g1 - g2) / 2
                    tracker.set_target(g, noise=-0.5 * g)
                refresh[mode].append(time.perf_counter() - start)
        batch = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
        for mode in MODES[step % len(MODES):] + MODES[:step % len(MODES)]:  # rotated: no mode always runs first
            model, optimizer = models[mode], optimizers[mode]
            if mode in trackers:
                trackers[mode].spent = 0.0
            start, start_cpu = time.perf_counter(), time.process_time()
            optimizer.zero_grad(set_to_none=True)
            losses[mode](batch).backward()
            if mode in trackers:
                trackers[mode].collect(loss_scale=mean_loss_scale(BATCH))
            optimizer.step()
            elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            if step >= args.warmup:
                times[mode].append(elapsed)
                cpu[mode].append(elapsed_cpu)
                if mode in trackers:
                    terms[mode].append(trackers[mode].spent)
        for mode, tracker in trackers.items():
            taken = tracker.take()
            if step >= args.warmup:
                scores[mode].extend(taken)
    same = all(torch.equal(a, b) for mode in MODES[1:]
               for a, b in zip(models["train"].parameters(), models[mode].parameters()))

    from scipy.stats import spearmanr

    exact = torch.cat(scores["exact"]).numpy()
    flops = flop_model(models["train"], BATCH * SEQ, SEQ, 128, 2, VOCAB)
    base, base_min, base_cpu = (statistics.median(times["train"]), min(times["train"]),
                                statistics.median(cpu["train"]))
    rows = []
    for mode in MODES:
        median, fastest, median_cpu = statistics.median(times[mode]), min(times[mode]), statistics.median(cpu[mode])
        paired = statistics.median(t / b for t, b in zip(times[mode], times["train"]))
        row = {"mode": mode, "median_ms": 1e3 * median, "overhead_pct": 100 * (median / base - 1),
               "paired_overhead_pct": 100 * (paired - 1),
               "min_ms": 1e3 * fastest, "overhead_min_pct": 100 * (fastest / base_min - 1),
               "cpu_median_ms": 1e3 * median_cpu, "overhead_cpu_pct": 100 * (median_cpu / base_cpu - 1),
               "flop_overhead_pct": 100 * flops.get(f"{mode}_tracking", 0.0) / flops["train_step"],
               "terms_median_ms": 1e3 * statistics.median(terms[mode]) if mode in terms else 0.0,
               "terms_min_ms": 1e3 * min(terms[mode]) if mode in terms else 0.0,
               "terms_min_over_step_min_pct": 100 * min(terms[mode]) / base_min if mode in terms else 0.0,
               "refresh_ms": 1e3 * refresh[mode][-1] if mode in refresh else None,
               "spearman_vs_exact": None, "min_captured": None}
        if mode.startswith("rank"):
            low = torch.cat(scores[mode]).numpy()
            row["spearman_vs_exact"] = float(spearmanr(exact, low).statistic)
            row["min_captured"] = min(v["captured"] for v in trackers[mode].low_rank_layers.values())
        rows.append(row)
    load = os.getloadavg()
    n_params = sum(p.numel() for p in models["train"].parameters())
    print(f"{args.model} {n_params:,} parameters, batch {BATCH} x {SEQ}, {args.threads} "
          f"threads, {args.steps} steps after {args.warmup} warm-up, load average {load[0]:.1f} on "
          f"{os.cpu_count()} CPUs")
    print_table(rows)
    print("GFLOP per step: " + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in flops.items()))
    print(f"Spearman over {len(exact)} sequences; min_captured: smallest share of a factored ||G_W||^2 at rank "
          f"{RANK}; training bit-identical in every mode: {same}")
    name = "inbatch_overhead" if args.model == "gpt" else f"inbatch_overhead_{args.model}"
    name += "" if args.threads == 2 else f"_{args.threads}thread"
    name = args.name or name
    path = write_result(name, rows, {"settings": {"model": args.model, "parameters": n_params, "batch": BATCH,
                                                                "seq": SEQ, "vocab": VOCAB,
                                                                "rank": RANK, "steps": args.steps,
                                                                "warmup": args.warmup, "threads": args.threads,
                                                                "load_average": load},
                                                   "flops": flops, "training_bit_identical": same})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
