"""Where and how fast a run computes: the device, the autocast precision, torch's threads, torch.compile of the
training forward, and the AdamW implementation. Pure functions of the settings and the machine; nothing here reads
data or changes what a run computes beyond rounding (bf16 aside, BENCHMARKS.md)."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Iterator

import torch

from .config import NOT_COMPILED, PRECISIONS

log = logging.getLogger(__name__)


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (x86 `flags`, ARM `Features`); empty where it does not."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_supports_bf16(flags: set[str] | None = None) -> bool:
    """bf16 arithmetic in hardware: x86 AVX512-BF16 or AMX-BF16, ARM BF16. Without it autocast still runs, but
    converts around fp32 kernels: slower than fp32, so `precision: auto` stays in fp32 there.
    (torch.backends.cpu.get_cpu_capability() says AVX512 whether or not the BF16 extension is there.)"""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def autocast_dtype(precision: str, device: str, bf16_supported: bool) -> torch.dtype | None:
    """Pure: the autocast dtype of a run (None: fp32, no autocast). `cuda_bf16` (the default): bf16 on CUDA, fp32 on
    the CPU, whatever the CPU supports, so that a default CPU run computes the same on every CPU; `auto` takes bf16
    wherever the hardware has it, a CPU with bf16 arithmetic included; `fp32` and `bf16` are what they say."""
    if precision == "cuda_bf16":
        return torch.bfloat16 if device == "cuda" else None
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        return torch.bfloat16 if bf16_supported else None
    raise ValueError(f"train.speed.precision = {precision!r}: expected one of {list(PRECISIONS)}")


def resolve_device(precision: str = "cuda_bf16") -> tuple[str, torch.dtype | None]:
    """The device and the autocast dtype (None: fp32) of a run with `train.speed.precision` = precision."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # CUDA: bf16 arithmetic from compute capability 8 (Ampere) on; is_bf16_supported() also counts emulation.
    supported = torch.cuda.get_device_capability()[0] >= 8 if device == "cuda" else cpu_supports_bf16()
    if precision == "bf16" and not supported:
        log.warning("train.speed.precision = bf16 on a %s without bf16 arithmetic: emulated, slower than fp32", device)
    return device, autocast_dtype(precision, device, supported)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads for the run (null: torch's default, OMP_NUM_THREADS or the machine's cores),
    restored afterwards: the setting is process-wide, and a caller training several runs must not inherit it."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_optimizer(model: torch.nn.Module, lr: float, impl: str | None) -> torch.optim.Optimizer:
    """AdamW without weight decay. impl null: torch's default (on the CPU a Python loop over the parameters);
    `foreach`: one multi-tensor kernel per operation; `fused`: one fused kernel (CPU and CUDA). Same update up to
    rounding; the choice is saved in the optimizer's state, so a resumed run keeps it."""
    kwargs = {"foreach": True} if impl == "foreach" else {"fused": True} if impl == "fused" else {}
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, **kwargs)


class CompiledForward:
    """torch.compile'd per-sequence losses that fall back to the eager function when the first call fails: compile
    errors (no C++ compiler for inductor, an unsupported Python) only show when the compiled function first runs.
    A genuine error in the model raises again from the eager call."""

    def __init__(self, eager: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.eager, self.checked, self.failed = eager, False, None
        try:  # some Pythons (free-threaded builds, versions newer than the torch) refuse at torch.compile itself
            self.compiled = torch.compile(eager)
        except Exception as err:  # noqa: BLE001
            self.compiled, self.checked = eager, True
            self.failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            log.warning("train.speed.compile: torch.compile is unavailable here (%s); training eagerly", self.failed)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.checked:
            return self.compiled(tokens) if self.failed is None else self.eager(tokens)
        try:
            out = self.compiled(tokens)
        except Exception as err:  # noqa: BLE001  (any backend failure means: run eagerly)
            self.failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            log.warning("train.speed.compile: torch.compile failed here (%s); training eagerly", self.failed)
            out = self.eager(tokens)
        self.checked = True
        return out


def training_forward(model: torch.nn.Module, compile_: bool, strategy: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The training step's per-sequence losses: the model's own method, or (train.speed.compile) its torch.compile'd
    form,
    which fuses the model and the cross-entropy into fewer kernels (compiled at the first step: tens of seconds on a
    CPU). Not for the in-batch strategies (NOT_COMPILED), nor where torch.compile cannot run: those train eagerly,
    with a warning."""
    if not compile_:
        return model.sequence_losses
    if strategy in NOT_COMPILED:
        log.warning("train.speed.compile ignored for %s: its alignment hooks are not validated under torch.compile",
                    strategy)
        return model.sequence_losses
    return CompiledForward(model.sequence_losses)
