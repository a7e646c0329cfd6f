"""Every method of every experiment resolves to a valid `train` section of the trainer: a mistyped key or value in
the harness fails here, not hours into a run."""
from __future__ import annotations

import copy

import pytest

from dgamix.mixer import DGA, DoGE, InBatchDGA
from dgamix.trainer.config import read_config

from .conftest import ROOT


@pytest.fixture()
def experiments(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import experiments

    return experiments


def test_every_method_of_every_experiment_is_a_valid_train_section(experiments):
    for name, spec in experiments.EXPERIMENTS.items():
        for variant in spec.variants:
            _, overrides = experiments.variant_settings(spec, variant)
            for method in spec.methods:
                settings = copy.deepcopy(experiments.TRAIN) | spec.train | overrides | method.train
                config = read_config({"train": experiments.nested_train(settings)}, method.strategy)
                config.strategy_settings().validate()


def test_the_frontier_runs_use_the_anchored_defaults_and_the_static_blends(experiments):
    """The anchored settings the frontier experiments start from are the library's defaults, so the evidence
    measures what a user gets."""
    anchored = experiments.ANCHORED_DEFAULTS
    assert (anchored["strategy.dga.rule"], anchored["strategy.dga.eta"]) == (DGA().rule, DGA().eta)
    assert (anchored["strategy.inbatch.rule"], anchored["strategy.inbatch.eta"]) == (InBatchDGA().rule,
                                                                                   InBatchDGA().eta)
    assert (anchored["strategy.doge.every"], anchored["strategy.doge.batch_size"]) == (DoGE().every,
                                                                                     DoGE().batch_size)
    spec = experiments.EXPERIMENTS["frontier_all_data"]
    labels = [m.label for m in spec.methods]
    assert labels == ["uniform", "importance", "blend25", "blend50", "blend75", "doge", "dga_paper", "dga_anchored",
                      "inbatch", "inbatch_domains"]
    settings = copy.deepcopy(experiments.TRAIN) | spec.train | spec.methods[labels.index("dga_paper")].train
    assert read_config({"train": experiments.nested_train(settings)}, "dga_ema").strategy_settings().rule == "paper"


def test_the_longer_frontier_runs_train_what_their_question_needs(experiments):
    for regime in ("all_data", "token_limited"):  # the 300-step grid's methods and settings, at 1,000 steps
        short, long = (experiments.EXPERIMENTS[f"frontier_{regime}{end}"] for end in ("", "_long"))
        assert long.train["steps"] == 1000 and long.results_dir == f"frontier/{regime}_long"
        assert long.methods == short.methods
        assert {k: v for k, v in long.train.items() if k != "steps"} == {
            k: v for k, v in short.train.items() if k != "steps"}
    assert experiments.EXPERIMENTS["frontier_token_limited_long"].train["data.token_cap"] == 4000
    for regime in ("all_data", "token_limited"):  # where the online methods reweight coarse clusters, their start
        methods = experiments.EXPERIMENTS[f"frontier_{regime}"].methods
        online = {m.bases for m in methods if m.strategy in ("doge", "dga_ema", "inbatch")}
        start = [m for m in methods if m.label == "uniform_coarse"]
        assert online == ({"coarse"} if regime == "token_limited" else {"all"})
        assert [(m.strategy, m.bases) for m in start] == ([("uniform", "coarse")] if online == {"coarse"} else [])
    check = experiments.EXPERIMENTS["frontier_all_data_check"]
    assert check.train["steps"] == 3000 and check.results_dir == "frontier/all_data_check"
    assert [m.label for m in check.methods] == ["uniform", "blend25", "dga_anchored"]
