"""The sections of the offline stages (dgamix.core.sections) read through dgamix.core.config.load: every field is
documented, the shipped params.yaml holds exactly their defaults, and a misspelled key, a wrong type, a null where
None is not a value and an out-of-range value are each refused with an error that names `section.key`."""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import pytest
import yaml

from dgamix.core.config import defaults, load
from dgamix.core.defaults import DEFAULTS
from dgamix.core.errors import ParamError
from dgamix.core.sections import SECTIONS

from .conftest import ROOT

FIELDS = [(name, field) for name, cls in SECTIONS.items() for field in dataclasses.fields(cls)]


def field_id(item: tuple[str, dataclasses.Field]) -> str:
    return f"{item[0]}.{item[1].name}"


def hint(section: str, field: dataclasses.Field) -> typing.Any:
    return typing.get_type_hints(SECTIONS[section])[field.name]


def admits_none(kind: typing.Any) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind)


def test_every_section_but_train_has_its_dataclass():
    assert set(SECTIONS) == set(DEFAULTS) - {"train"}
    assert all(dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen for cls in SECTIONS.values())


@pytest.mark.parametrize("item", FIELDS, ids=field_id)
def test_every_field_has_a_one_line_doc(item):
    doc = item[1].metadata.get("doc", "")
    assert doc.strip() and "\n" not in doc, f"{field_id(item)} has no one-line doc"


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_params_yaml_sections_are_the_dataclass_defaults(name):
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert shipped[name] == defaults(SECTIONS[name]) == DEFAULTS[name]
    assert load(SECTIONS[name], shipped[name], name) == SECTIONS[name]()  # the defaults pass their own checks


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_a_misspelled_key_is_refused_naming_it(name):
    key = next(iter(DEFAULTS[name]))
    with pytest.raises(ParamError, match=rf"^{name}\.{key}x is not a setting of {name} \(expected one of .*{key}"):
        load(SECTIONS[name], {**DEFAULTS[name], f"{key}x": DEFAULTS[name][key]}, name)


@pytest.mark.parametrize("item", FIELDS, ids=field_id)
def test_a_wrong_type_is_refused_naming_the_key(item):
    name, field = item
    kind = hint(name, field)
    dict_field = dict in {typing.get_origin(kind), *(typing.get_origin(a) for a in typing.get_args(kind))}
    wrong = 3 if dict_field else {"not": "this"}
    with pytest.raises(ParamError, match=rf"^{name}\.{field.name} = "):
        load(SECTIONS[name], {field.name: wrong}, name)


@pytest.mark.parametrize("item", FIELDS, ids=field_id)
def test_null_is_none_where_the_type_admits_it_and_refused_elsewhere(item):
    name, field = item
    if admits_none(hint(name, field)):
        assert getattr(load(SECTIONS[name], {field.name: None}, name), field.name) is None
    else:
        with pytest.raises(ParamError, match=rf"^{name}\.{field.name} = null: expected "):
            load(SECTIONS[name], {field.name: None}, name)


def test_max_fit_docs_left_out_is_the_default_cap_and_null_is_no_cap():
    cls = SECTIONS["cluster"]
    assert load(cls, {}, "cluster").max_fit_docs == DEFAULTS["cluster"]["max_fit_docs"] == 262144
    assert load(cls, {"max_fit_docs": None}, "cluster").max_fit_docs is None


def test_values_are_converted():
    cfg = load(SECTIONS["tokenize"], {"output": "file:///tmp/tokens", "holdout_fraction": 0, "docs": "d"}, "tokenize")
    assert cfg.output == Path("/tmp/tokens") and cfg.docs == Path("d")
    assert isinstance(cfg.holdout_fraction, float) and cfg.holdout_fraction == 0.0
    with pytest.raises(ParamError, match=r"^tokenize\.output = 's3://b/t': expected a path or file:// URL"):
        load(SECTIONS["tokenize"], {"output": "s3://b/t"}, "tokenize")
    with pytest.raises(ParamError, match=r"^stats\.keywords = True: expected int"):
        load(SECTIONS["stats"], {"keywords": True}, "stats")  # a flag where a count is expected


@pytest.mark.parametrize("name, values, message", [
    ("ingest", {"inputs": ["a", 1]}, r"ingest.inputs = \['a', 1\]: expected a list of paths, globs or URLs"),
    ("ingest", {"engine": "spark"}, r"ingest.engine = 'spark': expected local or ray"),
    ("embed", {"max_tokens": 0}, r"embed.max_tokens = 0: expected a positive integer"),
    ("embed", {"seed": -1}, r"embed.seed = -1: expected a non-negative integer"),
    ("embed", {"backend": "onnx"}, r"embed.backend = 'onnx': expected one of torch, openvino, openvino-int8"),
    ("embed", {"backend": "openvino", "device": "cuda"}, r"embed.backend = 'openvino' runs on the CPU only"),
    ("embed", {"verify_levels": []}, r"embed.verify_levels = \[\]: expected a list of positive integers"),
    ("embed", {"verify": True, "verify_docs": 10}, r"embed.verify_levels = \[8, 8\] ask for more clusters than "
                                                   r"embed.verify_docs = 10"),
    ("cluster", {"levels": [4, 0]}, r"cluster.levels = \[4, 0\]: expected a non-empty list of positive integers"),
    ("cluster", {"iterations": 0}, r"cluster.iterations = 0: expected a positive integer"),
    ("cluster", {"backend": "gpu"}, r"cluster.backend = 'gpu': expected auto, faiss or torch"),
    ("cluster", {"levels": [4, 4], "max_fit_docs": 10}, r"cluster.max_fit_docs = 10: expected at least one "
                                                         r"document per fine cluster \(16 for levels \[4, 4\]\)"),
    ("assign", {"backend": "gpu"}, r"assign.backend = 'gpu': expected auto, faiss or torch"),
    ("assign", {"engine": "spark"}, r"assign.engine = 'spark': expected local or ray"),
    ("stats", {"keyword_terms": 0}, r"stats.keyword_terms = 0: expected a positive integer"),
    ("tokenize", {"vocab_size": 100}, r"tokenize.vocab_size = 100: expected at least 257"),
    ("tokenize", {"holdout_fraction": 1.0}, r"tokenize.holdout_fraction = 1.0: expected 0 <= fraction < 1"),
    ("targets", {"sets": {"spec": []}}, r"targets.sets.spec = \[\]: expected a non-empty list of paths"),
    ("targets", {"sets": {"a/b": ["x"]}}, r"targets.sets: set name 'a/b' must be a plain folder name"),
    ("bases", {"families": ["importance", "nope"]}, r"bases.families = \['importance', 'nope'\]: expected a "
                                                     r"non-empty subset of"),
    ("bases", {"smoothing": -1}, r"bases.smoothing = -1.0: expected a non-negative pseudo-count"),
    ("ray", {"max_retries": -1}, r"ray.max_retries = -1: expected a non-negative integer"),
    ("ray", {"concurrency": 0}, r"ray.concurrency = 0: expected a positive integer or null"),
])
def test_out_of_range_values_are_refused_naming_the_key(name, values, message):
    with pytest.raises(ParamError, match="^" + message):
        load(SECTIONS[name], values, name)


def test_checks_that_depend_on_another_setting_follow_it():
    """The CPU-only backends are fine where the encoder comes from encoder_from, and a given tokenizer makes
    vocab_size moot; verify_docs bounds verify_levels only when verifying."""
    assert load(SECTIONS["embed"], {"backend": "openvino", "device": "cuda", "encoder_from": "e"}, "embed")
    assert load(SECTIONS["tokenize"], {"tokenizer": "t.json", "vocab_size": 100}, "tokenize")
    assert load(SECTIONS["embed"], {"verify_docs": 10}, "embed")


def test_a_section_that_is_not_a_mapping_is_refused():
    with pytest.raises(ParamError, match=r"^ray = \[1\]: expected a mapping of address, num_cpus"):
        load(SECTIONS["ray"], [1], "ray")
    assert load(SECTIONS["ray"], None, "ray") == SECTIONS["ray"]()  # a missing section: every default
