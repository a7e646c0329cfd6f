"""Training-step throughput of the reference trainer under its speed options (`train.speed.threads`,
`train.speed.precision`, `train.speed.compile`, `train.optim.adamw_impl`), side by side, and the loss each
configuration reaches.

    .venv/bin/python bench/train_speed.py [--steps 60] [--warmup 5] [--threads N] [--sizes small large]
    # writes bench/results/train_speed.json; --steps 3 --warmup 1 --sizes small checks that it runs

What is timed is the trainer's own step: `loop.forward_backward` (autocast, forward through the training forward
that `hardware.training_forward` builds, compiled or not, backward) and the optimizer's step (`hardware.make_optimizer`),
on the CPU. Not timed: the mixer stream's draw (bench/mixer_throughput.py) and evaluation. Sizes: `small` is
experiments/experiments.py's TRAIN (2 layers, 4 heads, 128 wide, batch 16 x 64 tokens), `large` 4 layers, 4 heads,
256 wide, batch 16 x 256 tokens; vocabulary 8192 (tokenize's default).

Configurations: the fp32 baseline (1 thread, torch's default AdamW, eager), each option alone (+threads: --threads,
default the cores this process may use; +bf16: `precision: auto`, i.e. bf16 only where the CPU computes in bf16;
+compile; +fused AdamW), all of them together, and the baseline with another model seed (`noise`: how far two seeds'
losses lie apart, the scale against which the options' loss differences are read). Every configuration trains the
same batches, from a seeded first-order Markov chain over the vocabulary (learnable, so the loss falls well below
ln 8192 and a precision problem would show). One step of each configuration in turn per round (order rotating), so
machine load falls on all alike; compilation happens in the warm-up and is reported apart. tokens/s: batch x
seq_len over the median step time after warm-up; `ratio`: against the baseline; `loss`: the mean training loss of
the last 10 steps (after warm-up + steps steps); `dloss`: its difference from the baseline's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from common import print_table, write_result

from dgamix.trainer import hardware, loop
from dgamix.trainer.model import GPT, GPTConfig

VOCAB = 8192
SIZES = {"small": {"n_layer": 2, "n_head": 4, "n_embd": 128, "seq_len": 64, "batch_size": 16},
         "large": {"n_layer": 4, "n_head": 4, "n_embd": 256, "seq_len": 256, "batch_size": 16}}
LR = 3e-3  # experiments/experiments.py's TRAIN


@dataclass
class Option:
    """One configuration: the trainer's parameters it sets."""

    name: str
    threads: int
    precision: str
    compile: bool
    adamw_impl: str | None
    seed: int = 0


def configurations(threads: int) -> list[Option]:
    return [Option("baseline", 1, "fp32", False, None),
            Option("+threads", threads, "fp32", False, None),
            Option("+bf16", 1, "auto", False, None),
            Option("+compile", 1, "fp32", True, None),
            Option("+fused", 1, "fp32", False, "fused"),
            Option("all", threads, "auto", True, "fused"),
            Option("noise", 1, "fp32", False, None, seed=1)]


def markov_batches(steps: int, batch: int, seq_len: int, seed: int = 0) -> list[torch.Tensor]:
    """Token batches from a fixed random Markov chain: each token has 4 likely successors (90%) over a uniform
    floor, so there is something to learn. The same batches for every configuration."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, VOCAB, size=(VOCAB, 4))
    out = []
    for _ in range(steps):
        tokens = np.empty((batch, seq_len + 1), dtype=np.int64)
        tokens[:, 0] = rng.integers(0, VOCAB, size=batch)
        for t in range(1, seq_len + 1):
            follow = successors[tokens[:, t - 1], rng.integers(0, 4, size=batch)]
            tokens[:, t] = np.where(rng.random(batch) < 0.9, follow, rng.integers(0, VOCAB, size=batch))
        out.append(torch.from_numpy(tokens))
    return out


class Runner:
    """A model and optimizer built the trainer's way for one configuration, stepped one batch at a time."""

    def __init__(self, option: Option, size: dict) -> None:
        self.option = option
        torch.manual_seed(option.seed)
        self.model = GPT(GPTConfig(vocab_size=VOCAB, block_size=size["seq_len"], n_layer=size["n_layer"],
                                   n_head=size["n_head"], n_embd=size["n_embd"]))
        self.optimizer = hardware.make_optimizer(self.model, LR, option.adamw_impl)
        self.forward: Callable = hardware.training_forward(self.model, option.compile, "uniform")
        # The CPU, even where CUDA exists: this benchmark measures the CPU options (experiments/gpu_suite.py the GPU).
        self.device = "cpu"
        self.autocast = hardware.autocast_dtype(option.precision, "cpu", hardware.cpu_supports_bf16())
        self.times: list[float] = []
        self.losses: list[float] = []

    def step(self, tokens: torch.Tensor, timed: bool) -> None:
        with hardware.torch_threads(self.option.threads):
            started = time.perf_counter()
            _, loss = loop.forward_backward(self.forward, self.optimizer, tokens.to(self.device), self.device,
                                             self.autocast)
            self.optimizer.step()
            self.losses.append(float(loss.detach()))  # the trainer's log reads it every step too
            elapsed = time.perf_counter() - started
        if timed:
            self.times.append(elapsed)
        else:
            self.warmup_s = getattr(self, "warmup_s", 0.0) + elapsed


def bench_size(name: str, size: dict, options: list[Option], steps: int, warmup: int) -> list[dict]:
    batches = markov_batches(warmup + steps, size["batch_size"], size["seq_len"])
    runners = [Runner(o, size) for o in options]
    for i, tokens in enumerate(batches):
        shift = i % len(runners)
        for runner in runners[shift:] + runners[:shift]:  # rotate the order: no configuration always runs first
            runner.step(tokens, timed=i >= warmup)
    tokens_per_step = size["batch_size"] * size["seq_len"]
    rows = []
    for runner in runners:
        o = runner.option
        rows.append({"size": name, "config": o.name, "threads": o.threads,
                     "precision": "fp32" if runner.autocast is None else "bf16",
                     "compiled": isinstance(runner.forward, hardware.CompiledForward) and runner.forward.failed is None,
                     "adamw": o.adamw_impl or "default", "seed": o.seed,
                     "step_ms": 1000 * statistics.median(runner.times),
                     "tokens_per_s": tokens_per_step / statistics.median(runner.times),
                     "warmup_s": runner.warmup_s, "loss": float(np.mean(runner.losses[-10:]))})
    base = rows[0]
    for r in rows:
        r["ratio"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["dloss"] = r["loss"] - base["loss"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps (compilation happens here)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads of +threads and all (default: the cores this process may use)")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["small", "large"])
    parser.add_argument("--name", default="train_speed", help="result file name under bench/results")
    args = parser.parse_args()
    bf16 = hardware.cpu_supports_bf16()
    print(f"{args.threads} threads for +threads; CPU bf16 arithmetic: {bf16} (otherwise +bf16 runs in fp32); "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for name in args.sizes:
        rows += bench_size(name, SIZES[name], configurations(args.threads), args.steps, args.warmup)
        print_table([{k: r[k] for k in ("size", "config", "threads", "precision", "compiled", "adamw", "step_ms",
                                        "tokens_per_s", "ratio", "loss", "dloss", "warmup_s")}
                     for r in rows if r["size"] == name], flush=True)
    print("wrote", write_result(args.name, rows, {"args": vars(args), "cpu_bf16": bf16, "sizes": SIZES,
                                                 "load_average": os.getloadavg()}))


if __name__ == "__main__":
    main()
