"""The `train` section of params.yaml, nested by part: one frozen dataclass each, with its defaults and a one-line
doc per field (the README's configuration table lists them), read by `read_config` with errors naming
`train.part.key`. The strategy settings are the mixer's own (`dgamix.mixer.DGA`, `InBatchDGA`, `DoGE`): their
defaults are defined there, once.

    train:
      strategies: [...]      # the runs `dvc repro` makes
      steps, seed, checkpoint_every
      model:    the reference GPT's size
      optim:    AdamW
      data:     what the mixer draws (sequence shape, token cap, bases)
      strategy: dga (dga and dga_ema; dga runs with beta 1), inbatch (inbatch and inbatch_domains, which runs over
                every fine cluster), doge
      eval:     evaluation interval, batches and their seed
      speed:    precision, torch.compile, threads
      paths:    the stores the run reads and where runs go

`seeds_for` derives each random consumer's seed from `train.seed` by purpose.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

from ..core.config import load, setting
from ..core.errors import ParamError
from ..mixer import DGA, ODM, DoGE, InBatchDGA, Static
from ..mixer.mixer import ALIGNMENT, STREAM, purpose_seed
from ..mixer.strategies import StrategySpec

STRATEGIES = ["uniform", "natural", "importance", "blend", "dga", "dga_ema", "inbatch", "inbatch_domains", "odm",
              "doge"]
# Strategies whose training forward carries the in-batch tracker's module and tensor hooks: torch.compile would
# trace them into the graph (or break it at every hook), which the tracker was never validated against.
NOT_COMPILED = ("inbatch", "inbatch_domains")


class RunSeeds(NamedTuple):
    """The seed of each consumer of randomness in a run (`seeds_for`)."""

    model: int  # the model's initial parameters
    stream: int  # the training stream: which cluster each sequence comes from, the corpus store's document orders
    alignment: int  # the strategies' alignment draws: fresh batches per basis, the target store's document order
    eval: int  # the evaluation batches, when train.eval.seed is null
    dropout: int  # torch's global RNG while training (dropout; the reference GPT has none, a model with it reproduces)


def seeds_for(seed: int) -> RunSeeds:
    """Pure: each purpose's seed, derived from `train.seed` and the purpose's name (`purpose_seed`). Were every
    consumer seeded from one generator in turn, adding, removing or reordering an object would move the draws of all
    the ones after it; with a seed per purpose each draws the same whatever else the run builds. The stream's and the
    alignment's are the ones `Mixer(seed=seed)` derives for itself."""
    return RunSeeds(model=purpose_seed(seed, "model"), stream=purpose_seed(seed, STREAM),
                    alignment=purpose_seed(seed, ALIGNMENT), eval=purpose_seed(seed, "eval"),
                    dropout=purpose_seed(seed, "dropout"))


def _positive(section: str, **values: Any) -> None:
    for name, value in values.items():
        if value is not None and not value > 0:
            raise ValueError(f"{section}.{name} = {value}: expected a positive number")


@dataclass(frozen=True)
class ModelSettings:
    n_layer: int = setting(2, "transformer blocks of the reference GPT")
    n_head: int = setting(4, "attention heads per block (n_embd must be a multiple)")
    n_embd: int = setting(128, "embedding width")

    def validate(self, section: str) -> None:
        _positive(section, n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd)
        if self.n_embd % self.n_head:  # attention splits the embedding evenly over the heads
            raise ValueError(f"{section}.n_embd = {self.n_embd}: expected a multiple of {section}.n_head = "
                             f"{self.n_head}")


@dataclass(frozen=True)
class OptimSettings:
    lr: float = setting(0.003, "AdamW learning rate (constant, no weight decay)")
    adamw_impl: Literal["foreach", "fused"] | None = setting(
        None, "AdamW implementation: null (torch's default), foreach or fused (same update up to rounding)")

    def validate(self, section: str) -> None:
        _positive(section, lr=self.lr)


@dataclass(frozen=True)
class DataSettings:
    seq_len: int = setting(64, "tokens per training sequence (the model sees seq_len + 1 with the shifted targets)")
    batch_size: int = setting(16, "sequences per training step")
    token_cap: int | None = setting(None, "tokens per cluster (the token-limited regime), or null for all")
    basis_names: list[str] | None = setting(None, "a subset of the bases by name, or null for all of them")

    def validate(self, section: str) -> None:
        _positive(section, seq_len=self.seq_len, batch_size=self.batch_size, token_cap=self.token_cap)


@dataclass(frozen=True)
class StrategySettings:
    dga: DGA = setting(DGA(), "exact DGA (strategies dga, with beta 1, and dga_ema)")
    inbatch: InBatchDGA = setting(InBatchDGA(), "in-batch DGA (inbatch; inbatch_domains: level clusters)")
    doge: DoGE = setting(DoGE(), "the DoGE baseline (doge)")
    blend: float = setting(0.5, "blend: the importance basis's share of the weights, the rest uniform over the bases "
                                "(a point of the static frontier between importance and uniform sampling)")

    def validate(self, section: str) -> None:
        if isinstance(self.blend, bool) or not isinstance(self.blend, (int, float)) or not 0.0 <= self.blend <= 1.0:
            raise ValueError(f"{section}.blend = {self.blend!r}: expected the importance basis's share of the "
                             "weights, 0 <= blend <= 1")


@dataclass(frozen=True)
class EvalSettings:
    every: int = setting(50, "steps between evaluations (and at the end)")
    batches: int = setting(4, "batches per evaluation set")
    seed: int | None = setting(None, "seed of the evaluation draws: null for one derived from train.seed, an int for "
                                     "the same batches in every run")

    def validate(self, section: str) -> None:
        _positive(section, every=self.every, batches=self.batches)
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"{section}.seed = {self.seed}: expected null or a non-negative integer")


Precision = Literal["cuda_bf16", "fp32", "bf16", "auto"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


@dataclass(frozen=True)
class SpeedSettings:
    # The default is cuda_bf16, not auto: auto takes bf16 on a CPU with bf16 arithmetic too, and the default CPU run
    # stays in fp32, so that it reproduces on every CPU.
    precision: Precision = setting(
        "cuda_bf16", "cuda_bf16: bf16 autocast on CUDA, fp32 on the CPU; fp32; bf16; or auto (bf16 where the hardware "
                     "has it, a CPU with bf16 arithmetic included)")
    compile: bool = setting(False, "torch.compile the training forward (not for the in-batch strategies)")
    threads: int | None = setting(None, "torch threads (null: torch's default, OMP_NUM_THREADS or the cores)")

    def validate(self, section: str) -> None:
        _positive(section, threads=self.threads)


@dataclass(frozen=True)
class PathSettings:
    tokens: Path = setting(Path("data/tokens"), "the corpus token store (tokenize stage)")
    bases: Path = setting(Path("data/bases"), "the basis distributions (bases stage)")
    target: Path = setting(Path("data/targets/spec/tokens"), "the specialized set's store (DGA's alignment target)")
    target_eval: Path = setting(Path("data/targets/eval/tokens"), "the held-out specialized set: the reported loss")
    output: Path = setting(Path("runs"), "where runs go: <output>/<strategy>")


@dataclass(frozen=True)
class TrainSettings:
    """The whole `train` section."""

    strategies: list[str] = setting(["uniform", "importance", "dga_ema", "inbatch"],
                                    "the reference runs `dvc repro` makes (one per entry)")
    steps: int = setting(200, "optimizer steps per run")
    seed: int = setting(0, "the run's seed: the model, the stream, the alignment and the evaluation draws each "
                           "get their own seed derived from it (seeds_for)")
    checkpoint_every: int = setting(100, "steps between checkpoints (a killed run resumes from the last)")
    model: ModelSettings = setting(ModelSettings(), "the reference GPT")
    optim: OptimSettings = setting(OptimSettings(), "the optimizer")
    data: DataSettings = setting(DataSettings(), "what the mixer draws")
    strategy: StrategySettings = setting(StrategySettings(), "each strategy's settings")
    eval: EvalSettings = setting(EvalSettings(), "evaluation")
    speed: SpeedSettings = setting(SpeedSettings(), "speed options (all off: runs reproduce bit for bit)")
    paths: PathSettings = setting(PathSettings(), "stores read and outputs written")

    def validate(self, section: str) -> None:
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if not self.strategies or unknown:
            raise ValueError(f"{section}.strategies = {self.strategies!r}: expected a non-empty list of "
                             f"{STRATEGIES}")
        _positive(section, steps=self.steps, checkpoint_every=self.checkpoint_every)
        if self.seed < 0:
            raise ValueError(f"{section}.seed = {self.seed}: expected a non-negative integer")


@dataclass(frozen=True)
class RunConfig:
    """One run: the train section and the strategy it trains."""

    strategy: str
    train: TrainSettings

    @property
    def out_dir(self) -> Path:
        return self.train.paths.output / self.strategy

    def strategy_settings(self) -> StrategySpec:
        """The mixer's settings for this run's strategy."""
        name, settings = self.strategy, self.train.strategy
        if name == "odm":
            return ODM()
        if name == "uniform":
            return Static()
        if name in ("natural", "importance"):
            return Static(basis=name)
        if name == "blend":
            return Static(basis="importance", share=settings.blend)
        if name == "inbatch_domains":  # domain reweighting over every fine cluster that has tokens
            return _replace(settings.inbatch, level="clusters")
        if name == "inbatch":
            return settings.inbatch
        if name == "doge":
            return settings.doge
        if name == "dga":  # dga_ema with beta 1: no EMA
            return _replace(settings.dga, beta=1.0)
        return settings.dga


def _replace(spec: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(spec, **changes)


def read_config(params: dict[str, Any], strategy: str) -> RunConfig:
    """The `train` section for one strategy; a key left out takes its default (the dataclasses above)."""
    if strategy not in STRATEGIES:
        raise ParamError(f"strategy = '{strategy}' (dgamix train --strategy): expected one of {STRATEGIES}")
    train = params.get("train")
    speed = train.get("speed") if isinstance(train, dict) else None
    if isinstance(speed, dict) and "precision" in speed and speed["precision"] is None:
        # null once meant what cuda_bf16 means now: say so, for the params files written before
        raise ParamError(f"train.speed.precision = null: expected one of {list(PRECISIONS)} (cuda_bf16 is what null "
                         "meant: bf16 autocast on CUDA, fp32 on the CPU)")
    return RunConfig(strategy, load(TrainSettings, params.get("train"), "train"))
