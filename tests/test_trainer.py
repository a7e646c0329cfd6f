"""The reference trainer on the real fixture pipeline: every strategy runs, logs, evaluates, resumes and plots."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Iterator

import polars as pl
import pytest
import yaml

from dgamix.core.config import defaults
from dgamix.core.errors import ParamError
from dgamix.pipeline import assign, bases, cluster, tokens
from dgamix.trainer import hardware, loop, plot
from dgamix.trainer.plot import plot_runs
from dgamix.trainer.config import TrainSettings, seeds_for
from dgamix.trainer.train import read_config, run

from .conftest import chdir, load_params, run_target_stages, set_train

METRICS = {"final_spec_loss", "final_generic_loss", "bases", "final_weights"}


@pytest.fixture(scope="module")
def pipeline_workspace(embedded_workspace, tmp_path_factory) -> Path:
    """The fixture corpus through cluster, assign, tokenize, the target stages and bases (once per module; tests
    copy it)."""
    work = tmp_path_factory.mktemp("trainer") / "ws"
    shutil.copytree(embedded_workspace, work)
    params = load_params(work)
    params["tokenize"]["vocab_size"] = 512
    with chdir(work):
        for stage in (cluster, assign, tokens):
            stage.run(params)
        run_target_stages(params)
        bases.run(params)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    return work


@pytest.fixture
def trainer_params(pipeline_workspace, tmp_path) -> Iterator[dict]:
    """A private copy of the pipeline workspace (the process inside it) and small train parameters."""
    work = tmp_path / "ws"
    shutil.copytree(pipeline_workspace, work)
    params = load_params(work)
    set_train(params, {"steps": 6, "data.seq_len": 16, "data.batch_size": 4, "model.n_layer": 1, "model.n_embd": 32,
                       "model.n_head": 2, "eval.every": 3, "eval.batches": 1, "strategy.dga.every": 3,
                       "strategy.dga.batch_size": 2, "strategy.doge.every": 3, "strategy.doge.batch_size": 2,
                       "strategy.inbatch.target_batch_size": 2})
    with chdir(work):
        yield params


def test_every_strategy_trains_and_is_plotted(trainer_params):
    params, workspace = trainer_params, Path.cwd()
    names = json.loads((workspace / "data/bases/names.json").read_text())
    for strategy in ("uniform", "importance", "dga_ema", "odm"):
        result = run(params, strategy)
        out = workspace / "runs" / strategy
        metrics = json.loads((out / "metrics.json").read_text())
        summary = json.loads((out / "summary.json").read_text())
        # metrics.json: only the losses are scalars (one `dvc metrics show` column each), rounded for reading
        assert set(metrics) == METRICS and metrics["final_spec_loss"] > 0 and metrics["final_generic_loss"] > 0
        assert all(round(metrics[k], 6) == metrics[k] for k in METRICS - {"bases", "final_weights"})
        assert summary["best_spec_loss"] <= metrics["final_spec_loss"] and len(metrics["final_weights"]) == len(
            metrics["bases"])
        assert summary["strategy"] == strategy and summary["steps"] == 6 and summary["parameters"] > 0
        assert result == summary | metrics and not (out / "checkpoint.pt").exists()
        frame = pl.read_csv(out / "log.csv", infer_schema_length=None)
        assert frame.height == 6 and frame["spec_loss"].drop_nulls().len() == 2
        assert frame["spec_loss"].drop_nulls()[-1] == pytest.approx(metrics["final_spec_loss"], abs=1e-6)
        if strategy == "odm":  # EXP3 over the coarse clusters (disjoint domains)
            assert [c[2:] for c in frame.columns if c.startswith("w:")] == [n for n in names if n.startswith("coarse:")]
            continue
        assert [c[2:] for c in frame.columns if c.startswith("w:")] == names
        # every step's tokens (4 sequences x 17) attributed to the bases, and the same total per cluster
        per_basis = frame.select([c for c in frame.columns if c.startswith("t:")]).sum_horizontal()
        assert per_basis.round(2).to_list() == [68.0] * 6
        drawn = pl.read_parquet(out / "clusters.parquet")
        assert drawn.group_by("step").agg(pl.col("tokens").sum()).sort("step")["tokens"].to_list() == [68] * 6
        if strategy == "importance":
            assert frame["w:importance"].to_list() == [1.0] * 6
    dga = pl.read_csv(workspace / "runs/dga_ema/log.csv", infer_schema_length=None)
    # alignment scores after step 3 only: the update after step 6, the last, would never be trained on
    assert dga["a:importance"].drop_nulls().len() == 1 and dga["a:importance"][2] is not None
    assert dga.row(0)[5:5 + len(names)] != dga.row(5)[5:5 + len(names)]  # DGA moved the weights
    odm = pl.read_csv(workspace / "runs/odm/log.csv", infer_schema_length=None)
    assert odm.row(0)[5:7] != odm.row(5)[5:7]  # the bandit moved its policy
    set_train(params, {"strategy.dga.estimator": "forward"})
    run(params, "dga")
    assert pl.read_csv(workspace / "runs/dga/log.csv", infer_schema_length=None)["a:importance"].drop_nulls().len() == 1

    written = plot_runs(workspace / "runs")
    assert all(p.stat().st_size > 0 for p in written) and len(written) == 2 + 1 + 5  # CSVs, losses.png, weights
    spec = pl.read_csv(workspace / "runs/plots/spec_loss.csv")
    assert spec.columns == ["step", "dga", "dga_ema", "importance", "odm", "uniform"]
    assert spec["step"].to_list() == [2, 5]  # the evaluated steps only (0-based, as in log.csv)
    assert spec["uniform"].to_list() == logged_losses(workspace / "runs/uniform/log.csv", "spec_loss")
    # the stage plots the runs dvc.yaml trains, in their order
    params["train"]["strategies"] = ["uniform", "dga_ema"]
    assert plot.run(params)["written"][-2:] == ["runs/plots/weights_uniform.png", "runs/plots/weights_dga_ema.png"]
    assert pl.read_csv(workspace / "runs/plots/generic_loss.csv").columns == ["step", "uniform", "dga_ema"]
    params["train"]["strategies"] = ["uniform", "natural"]
    with pytest.raises(FileNotFoundError, match="natural"):
        plot.run(params)
    with pytest.raises(ParamError, match="strategy = 'nope' \\(dgamix train --strategy\\)"):
        run(params, "nope")


def logged_losses(log_csv: Path, column: str) -> list[float]:
    frame = pl.read_csv(log_csv, infer_schema_length=None)
    return frame[column].drop_nulls().cast(pl.Float64).to_list()


class Killed(Exception):
    """Stands for the process dying right after a checkpoint was written."""


def kill_after_checkpoint(monkeypatch, params, strategy: str, at_step: int) -> None:
    """Run until the checkpoint before step `at_step` is written, then die there (as a killed job would)."""
    save = loop.save_checkpoint

    def save_then_die(path, objects, next_step, history):
        save(path, objects, next_step, history)
        if next_step == at_step:
            raise Killed

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        run(params, strategy)
    monkeypatch.undo()


@pytest.mark.parametrize("strategy", ["dga_ema", "odm", "inbatch"])
def test_resumed_run_matches_a_straight_run(trainer_params, monkeypatch, strategy):
    params = copy.deepcopy(trainer_params)
    set_train(params, {"checkpoint_every": 2, "paths.output": "straight"})
    run(params, strategy)

    set_train(params, {"paths.output": "resumed"})
    kill_after_checkpoint(monkeypatch, params, strategy, at_step=4)
    resumed = Path("resumed") / strategy
    assert (resumed / "checkpoint.pt").exists() and not (resumed / "log.csv").exists()
    other = copy.deepcopy(params)
    set_train(other, {"data.batch_size": 2})
    with pytest.raises(ParamError, match="checkpoint.pt was saved by a run with other data or train parameters"):
        run(other, strategy)
    assert run(params, strategy)["steps"] == 6
    names = ("log.csv", "clusters.parquet", "metrics.json") + (("alignment.parquet",) if strategy == "inbatch" else ())
    for name in names:  # every step drawn, also the ones before the kill
        assert (resumed / name).read_bytes() == (Path("straight") / strategy / name).read_bytes(), name
    assert not (resumed / "checkpoint.pt").exists()


@pytest.mark.parametrize("strategy, level_names", [("inbatch", "bases"), ("inbatch_domains", "clusters")])
def test_in_batch_strategies_score_every_step_and_record_the_clusters(trainer_params, strategy, level_names):
    set_train(trainer_params, {"strategy.inbatch.min_sequences": 1, "strategy.inbatch.refresh": 2})
    run(trainer_params, strategy)
    out = Path("runs") / strategy
    frame = pl.read_csv(out / "log.csv", infer_schema_length=None)
    weights = [c for c in frame.columns if c.startswith("w:")]
    if level_names == "clusters":  # one weight per fine cluster with tokens
        from dgamix.mixer import ClusterStore

        assert len(weights) == int(ClusterStore("data/tokens").available.sum())
        assert all(c.startswith("w:cluster:") for c in weights)
    # updated after every step but the last (nothing trains on an update after it)
    assert frame[f"a:{weights[0][2:]}"].drop_nulls().len() == 5 and frame[f"a:{weights[0][2:]}"][5] is None
    assert frame.row(0)[5:5 + len(weights)] != frame.row(5)[5:5 + len(weights)]  # the weights moved
    record = pl.read_parquet(out / "alignment.parquet")
    assert record.columns == ["step", "cluster", "sequences", "mean_alignment"]
    drawn = pl.read_parquet(out / "clusters.parquet").filter(pl.col("step") < 5)
    # each updated step's record covers exactly the clusters drawn at that step, with their sequences (4 per step)
    assert record.group_by("step").agg(pl.col("sequences").sum()).sort("step")["sequences"].to_list() == [4] * 5
    assert set(zip(record["step"], record["cluster"])) == set(zip(drawn["step"], drawn["cluster"]))
    written = plot.plot_runs(Path("runs"), [strategy])
    assert Path(f"runs/plots/alignment_{strategy}.png") in written


def test_doge_trains_reads_the_learning_rate_and_resumes(trainer_params, monkeypatch):
    """`dgamix train --strategy doge`: scores at step 3 (not after step 6, the last) within DoGE's bounds in units of
    train.optim.lr, weights that move, and a run killed after its step-4 checkpoint that resumes to the straight run's
    bytes."""
    params = copy.deepcopy(trainer_params)
    set_train(params, {"checkpoint_every": 2, "paths.output": "straight", "strategy.doge.clip_min": -5.0})
    run(params, "doge")
    frame = pl.read_csv(Path("straight/doge/log.csv"), infer_schema_length=None)
    scores = frame.select([c for c in frame.columns if c.startswith("a:")]).drop_nulls()
    assert scores.height == 1 and frame["skipped"].drop_nulls().to_list() == [False]
    lr = read_config(params, "doge").train.optim.lr
    assert all(-5 * lr <= v <= 5 * lr for row in scores.rows() for v in row) and any(v != 0 for v in scores.row(0))
    weights = [c for c in frame.columns if c.startswith("w:")]
    assert frame.row(0)[5:5 + len(weights)] != frame.row(5)[5:5 + len(weights)]  # DoGE moved the weights

    set_train(params, {"paths.output": "resumed"})
    kill_after_checkpoint(monkeypatch, params, "doge", at_step=4)
    other = set_train(copy.deepcopy(params), {"strategy.doge.mu": 0.01})
    with pytest.raises(ParamError, match="mu: saved 0.05, now 0.01"):
        run(other, "doge")
    # torch's optimizer loading would silently keep the saved choice
    other = set_train(copy.deepcopy(params), {"optim.adamw_impl": "foreach"})
    with pytest.raises(ParamError, match="adamw_impl: saved None, now 'foreach'"):
        run(other, "doge")
    run(params, "doge")
    for name in ("log.csv", "clusters.parquet", "metrics.json"):
        assert (Path("resumed/doge") / name).read_bytes() == (Path("straight/doge") / name).read_bytes(), name


def test_missing_eval_store_names_its_parameter(trainer_params):
    set_train(trainer_params, {"paths.target_eval": "data/targets/nowhere"})
    with pytest.raises(ParamError,
                       match=r"train.paths.target_eval = 'data/targets/nowhere'.*dgamix tokenize --target eval"):
        run(trainer_params, "uniform")


def test_train_section_defaults_and_checks():
    """params.yaml's train section is exactly the settings' defaults; each bad value is refused naming its key;
    null is a value, not "use the default"."""
    shipped = yaml.safe_load((Path(__file__).resolve().parent.parent / "params.yaml").read_text())["train"]
    assert shipped == defaults(TrainSettings)
    config = read_config({"train": {}}, "dga_ema")
    assert config.train == TrainSettings() and config.strategy_settings() == TrainSettings().strategy.dga
    assert read_config({}, "dga").strategy_settings().beta == 1.0  # dga: DGA without EMA
    assert read_config({}, "inbatch_domains").strategy_settings().level == "clusters"
    bad = [({"strategy": {"dga": {"eta": "0.3"}}}, "train.strategy.dga.eta"),
           ({"strategy": {"dga": {"eta": -1}}}, "train.strategy.dga.eta"),
           ({"strategy": {"dga": {"beta": 0}}}, "train.strategy.dga.beta"),
           ({"strategy": {"dga": {"beta": True}}}, "train.strategy.dga.beta"),
           ({"strategy": {"dga": {"estimator": "adjoint"}}}, "train.strategy.dga.estimator"),
           ({"strategy": {"dga": {"every": 2.5}}}, "train.strategy.dga.every"),
           ({"strategy": {"dga": {"target_batch_size": 0}}}, "train.strategy.dga.target_batch_size"),
           ({"strategy": {"dga": {"eat": 1}}}, "train.strategy.dga.eat is not a setting"),
           ({"strategy": {"inbatch": {"scale": "loud"}}}, "train.strategy.inbatch.scale"),
           ({"strategy": {"inbatch": {"floor": 1.0}}}, "train.strategy.inbatch.floor"),
           ({"strategy": {"doge": {"mu": 0}}}, "train.strategy.doge.mu"),
           ({"strategy": {"doge": {"clip_min": 6.0}}}, "train.strategy.doge.clip_min"),
           ({"strategy": {"doge": {"clip_max": float("inf")}}}, "train.strategy.doge.clip_max"),
           ({"strategy": {"doge": {"grad_clip": -1}}}, "train.strategy.doge.grad_clip"),
           ({"data": {"token_cap": 0}}, "train.data.token_cap"), ({"model": {"n_embd": 30}}, "train.model.n_embd"),
           ({"data": {"basis_names": [1]}}, r"train.data.basis_names\[0\]"),
           ({"optim": {"lr": "fast"}}, "train.optim.lr"), ({"seed": -1}, "train.seed"),
           ({"steps": None}, "train.steps = null"), ({"eta": 0.3}, "train.eta is not"),
           ({"speed": {"precision": "fp16"}}, "train.speed.precision"),
           ({"speed": {"precision": None}}, "train.speed.precision = null: expected one of \\['cuda_bf16', 'fp32', "
                                            "'bf16', 'auto'\\] \\(cuda_bf16 is what null meant"),
           ({"optim": {"adamw_impl": "apex"}}, "train.optim.adamw_impl"), ({"eval": {"seed": -1}}, "train.eval.seed")]
    for override, named in bad:
        with pytest.raises(ParamError, match=named.replace(".", r"\.")):
            read_config({"train": override}, "uniform")
    with pytest.raises(ParamError, match="strategy = 'nope' \\(dgamix train --strategy\\)"):
        read_config({"train": {}}, "nope")


def test_fixed_eval_seed_gives_every_seed_the_same_eval_batches(trainer_params):
    def batches(seed: int, eval_seed: int | None) -> list:
        params = copy.deepcopy(trainer_params)
        set_train(params, {"seed": seed, "eval.seed": eval_seed, "eval.batches": 2})
        evals = loop.load_eval_sets(read_config(params, "uniform"))
        return [t.tolist() for t in evals.spec + evals.generic]

    # an int: the same batches whatever the training seed (the seed-to-seed spread is training's alone)
    assert batches(0, 7) == batches(3, 7) != batches(0, 8)
    # null: the run seed's own evaluation seed
    assert batches(0, None) == batches(5, seeds_for(0).eval)
    assert batches(4, None) == batches(0, seeds_for(4).eval) != batches(0, None)
    set_train(trainer_params, {"eval.seed": 7, "seed": 3})
    summary = run(trainer_params, "uniform")
    assert summary["eval_seed"] == 7 and summary["seed"] == 3 and summary["seeds"] == seeds_for(3)._asdict()


def test_every_purpose_draws_from_its_own_seed(trainer_params, monkeypatch):
    """The model's initialization, the training stream, the alignment draws and the evaluation batches each draw from
    a seed derived from train.seed by purpose: an object added before the model that draws from torch's RNG, torch's
    and numpy's global RNGs consumed beforehand, and another construction order leave every one of them as it was."""
    import numpy as np
    import torch

    seeds = seeds_for(0)
    assert seeds == seeds_for(0) and len(set(seeds)) == len(seeds) and set(seeds_for(1)).isdisjoint(seeds)
    # pinned: recorded runs are reproduced from these, so the derivation must not change
    assert seeds == (1292732770, 1726147867, 1227891005, 523788306, 2026511872)
    config = read_config(trainer_params, "dga_ema")

    def draws(evals_first: bool) -> dict[str, list]:
        evals = loop.load_eval_sets(config) if evals_first else None
        objects = loop.build_run(config)
        evals = evals or loop.load_eval_sets(config)
        mixer = objects.mixer
        return {"model": [p.detach().clone() for p in objects.model.parameters()],
                "dropout": [torch.rand(4)],
                "stream": [mixer.next_batch()["tokens"] for _ in range(2)],
                "alignment": [mixer.stream.sample_basis(0, 2)["tokens"], mixer.target.sample(2)],
                "eval": evals.spec + evals.generic}

    reference = draws(evals_first=False)
    mixer = loop.build_run(config).mixer
    assert (mixer.stream.seed, mixer.stream.store.seed) == (seeds.stream, seeds.stream)
    assert (mixer.stream.basis_sampler.seed, mixer.target.store.seed) == (seeds.alignment, seeds.alignment)
    resolve = loop.resolve_device
    monkeypatch.setattr(loop, "resolve_device", lambda precision: (torch.rand(5), resolve(precision))[1])
    torch.rand(11), np.random.random(3)
    moved = draws(evals_first=True)
    for name, tensors in reference.items():
        assert len(tensors) == len(moved[name]) and all(map(torch.equal, tensors, moved[name])), name


def test_bf16_autocast_only_where_the_hardware_has_it():
    import torch

    dtype = hardware.autocast_dtype
    # auto: bf16 exactly where supported; cuda_bf16, the default: bf16 on CUDA, fp32 on any CPU
    assert dtype("auto", "cpu", True) is torch.bfloat16 and dtype("auto", "cpu", False) is None
    assert dtype("cuda_bf16", "cpu", True) is None and dtype("cuda_bf16", "cuda", True) is torch.bfloat16
    assert TrainSettings().speed.precision == "cuda_bf16"
    assert dtype("fp32", "cuda", True) is None and dtype("bf16", "cpu", False) is torch.bfloat16
    assert hardware.cpu_supports_bf16({"avx512f", "avx512_bf16"}) and hardware.cpu_supports_bf16({"amx_bf16"})
    assert not hardware.cpu_supports_bf16({"avx512f", "avx512bw", "avx2"}) and not hardware.cpu_supports_bf16(set())
    if not torch.cuda.is_available():  # this machine: auto follows its own flags, the default stays fp32
        flags = hardware.cpu_flags()
        expected = torch.bfloat16 if flags & {"avx512_bf16", "amx_bf16", "bf16"} else None
        assert hardware.resolve_device("auto") == ("cpu", expected)
        assert hardware.resolve_device() == ("cpu", None) == hardware.resolve_device("fp32")


def train_losses(strategy: str) -> list[float]:
    return pl.read_csv(Path("runs") / strategy / "log.csv", infer_schema_length=None)["train_loss"].to_list()


def test_speed_options_change_the_losses_by_rounding_only(trainer_params):
    import torch

    params = copy.deepcopy(trainer_params)
    baseline = run(params, "uniform")
    reference = (Path("runs/uniform/log.csv").read_bytes(), train_losses("uniform"))
    assert (baseline["precision"], baseline["compiled"]) == ("fp32", False)
    # fp32 spelled out, threads as they are: the very same run, byte for byte
    before = torch.get_num_threads()
    set_train(params, {"speed.precision": "fp32", "speed.threads": before, "paths.output": "explicit"})
    run(params, "uniform")
    assert Path("explicit/uniform/log.csv").read_bytes() == reference[0]
    # one thread, then the process's setting back
    set_train(params, {"speed.threads": 1, "paths.output": "one_thread"})
    assert run(params, "uniform")["threads"] == 1 and torch.get_num_threads() == before
    assert pl.read_csv("one_thread/uniform/log.csv")["train_loss"].to_list() == pytest.approx(reference[1], rel=1e-5)
    # fused AdamW: the same update up to float rounding
    set_train(params, {"speed.threads": None, "optim.adamw_impl": "fused", "paths.output": "fused"})
    run(params, "uniform")
    assert pl.read_csv("fused/uniform/log.csv")["train_loss"].to_list() == pytest.approx(reference[1], rel=1e-5)
    # auto: bf16 only where the CPU computes in bf16, and then within bf16 rounding (8 bits of mantissa)
    set_train(params, {"optim.adamw_impl": None, "speed.precision": "auto", "paths.output": "auto"})
    summary = run(params, "uniform")
    auto = pl.read_csv("auto/uniform/log.csv")["train_loss"].to_list()
    if hardware.cpu_supports_bf16() and not torch.cuda.is_available():
        assert summary["precision"] == "bfloat16" and auto != reference[1]
        assert auto == pytest.approx(reference[1], abs=0.05)
    else:
        assert summary["precision"] == "fp32" and auto == reference[1]


def test_compiled_training_forward_gives_the_eager_losses(trainer_params, caplog):
    import torch

    params = copy.deepcopy(trainer_params)
    eager = run(params, "dga_ema")
    losses = train_losses("dga_ema")
    set_train(params, {"speed.compile": True, "paths.output": "compiled"})
    with caplog.at_level("WARNING", logger="dgamix.trainer"):
        compiled = run(params, "dga_ema")
    if not compiled["compiled"]:
        pytest.skip(f"torch.compile does not run on this platform: {caplog.text.strip()}")
    assert not eager["compiled"]
    got = pl.read_csv("compiled/dga_ema/log.csv")["train_loss"].to_list()
    assert got == pytest.approx(losses, rel=1e-4)  # fused kernels: another summation order, same values
    # the in-batch strategies' hooks are not traced: compile is refused with a warning, the run trains eagerly
    set_train(params, {"paths.output": "inbatch"})
    with caplog.at_level("WARNING", logger="dgamix.trainer"):
        assert not run(params, "inbatch")["compiled"]
    assert "train.speed.compile ignored for inbatch" in caplog.text


def test_in_batch_runs_use_their_own_target_batch_size(trainer_params):
    """The in-batch strategy refreshes g_spe on train.strategy.inbatch.target_batch_size sequences, not on exact
    DGA's alignment batch size (every in-batch run once used those instead)."""
    set_train(trainer_params, {"strategy.inbatch.target_batch_size": 6, "strategy.dga.batch_size": 2,
                               "strategy.dga.target_batch_size": 4})
    config = read_config(trainer_params, "inbatch")
    strategy = loop.build_run(config).mixer.strategy
    assert strategy.target_batch_size == 6
    before = strategy.target.position  # in tokens: the refresh at construction read 6 sequences of seq_len + 1
    strategy.refresh_target()
    assert strategy.target.position - before == before == 6 * (16 + 1)


def test_a_blend_run_mixes_importance_and_uniform_sampling(trainer_params):
    """train.strategy.blend: the importance basis's share, the rest uniform over the bases."""
    import numpy as np

    set_train(trainer_params, {"strategy.blend": 0.25})
    mixer = loop.build_run(read_config(trainer_params, "blend")).mixer
    names = mixer.names
    expected = np.full(len(names), 0.75 / len(names))
    expected[names.index("importance")] += 0.25
    np.testing.assert_allclose(mixer.weights, expected)
