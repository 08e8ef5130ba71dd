"""One schema library (pydantic v2) for the filter YAML and the optimization YAML: every
section validated, enabled or not, messages naming the field path, and
``deepseek-rs config {schema,check}``."""

import json

import pytest
from deepseek_rs import InvalidValueError
from deepseek_rs.cli import main
from deepseek_rs.config import parse_config
from deepseek_rs.datafilter import FilterConfig


@pytest.mark.parametrize(
    "mapping, match",
    [
        # the example: a disabled section is still checked
        (
            {"hard_examples": {"enabled": False, "clusters": -5, "keep_fraction": "lots"}},
            r"hard_examples\.clusters: .*greater than or equal to 1, got -5; "
            r"hard_examples\.keep_fraction: input should be a valid number, got 'lots'",
        ),
        ({"domain": {"enabled": False, "topics": 0}}, r"domain\.topics: .*greater than or equal to 1"),
        ({"domain": {"method": "bm25"}}, r"domain\.method: input should be 'lda' or 'dsir', got 'bm25'"),
        ({"density": {"model": {"enabled": False, "min_density": 7}}}, r"density\.model\.min_density: "),
        (
            {"density": {"enabled": False, "thresholds": {"n_words": {"min": "5"}}}},
            r"thresholds\.n_words\.min",
        ),
        (
            {"density": {"thresholds": {"n_words": {"min": 100, "max": 10}}}},
            r"n_words: min \(100.0\) is above",
        ),
        ({"density": {"thresholds": {"nope": {"min": 1}}}}, r"density\.thresholds: unknown signal 'nope'"),
        ({"batch_docs": True}, r"batch_docs: input should be a valid integer, got True"),
        ({"output": {"annotate": 1}}, r"output\.annotate: input should be a valid boolean, got 1"),
        ({"output": {"colour": 1}}, r"unknown key output\.colour; allowed keys: \['annotate', 'compression'"),
        ({"hard_examples": {"keep_fraction": 0}}, r"keep_fraction: input should be greater than 0"),
        ({"hard_examples": {"seed": 1.5}}, r"hard_examples\.seed: input should be a valid integer"),
        ({"domain": {"enabled": True}}, r"domain: reference must name at least one JSONL shard"),
        ({"density": "yes"}, r"density: input should be a mapping, got 'yes'"),
    ],
)
def test_every_filter_field_is_validated_with_its_path(mapping, match):
    with pytest.raises(InvalidValueError, match=match):
        FilterConfig.from_mapping(mapping)


def test_shorthands_and_defaults_still_work(tmp_path):
    assert FilterConfig.from_mapping({"density": False}).density is False
    assert FilterConfig.from_mapping({"density": {"model": False}}).model_density is None
    c = FilterConfig.from_mapping({"domain": {"enabled": True, "reference": "r.jsonl"}}, base_dir=tmp_path)
    assert c.reference == [str(tmp_path / "r.jsonl")] and c.domain == "lda"
    assert FilterConfig.from_mapping({"hard_examples": {"enabled": False, "clusters": 3}}).clusters == 100
    assert FilterConfig.from_mapping({}) == FilterConfig()


def test_config_schema_prints_json_schema(capsys):
    assert main(["config", "schema", "filter"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert set(schema["properties"]) == {
        "batch_docs",
        "batch_bytes",
        "max_line_bytes",
        "output",
        "density",
        "domain",
        "hard_examples",
    }
    assert schema["additionalProperties"] is False
    hard = schema["$defs"]["HardExamplesSection"]["properties"]
    assert hard["clusters"]["minimum"] == 1 and hard["embedding"]["enum"] == ["hashed", "minilm"]
    assert main(["config", "schema", "optimize"]) == 0
    schema = json.loads(capsys.readouterr().out)
    batching = schema["$defs"]["BatchingSection"]["properties"]
    assert batching["min_size"]["minimum"] == 1 and batching["min_size"]["type"] == "integer"
    assert schema["$defs"]["QuantizationSection"]["properties"]["method"]["enum"] == ["QAT", "PTQ"]


def test_config_check_names_the_bad_field(tmp_path, capsys):
    bad = tmp_path / "f.yaml"
    bad.write_text("hard_examples: {enabled: false, clusters: -5, keep_fraction: lots}\n")
    assert main(["config", "check", "filter", str(bad)]) == 1
    assert "hard_examples.clusters" in capsys.readouterr().err
    good = tmp_path / "o.yaml"
    good.write_text("optimization: {batching: {min_size: 2, max_size: 8}}\n")
    assert main(["config", "check", "optimize", str(good)]) == 0
    assert "valid optimize configuration" in capsys.readouterr().out
    good.write_text("optimization: {batching: {min_size: yes}}\n")  # YAML 1.1: yes is a boolean
    assert main(["config", "check", "optimize", str(good)]) == 1
    assert "batching.min_size: input should be a valid integer, got True" in capsys.readouterr().err


def test_a_disabled_optimization_section_is_validated_too():
    with pytest.raises(InvalidValueError, match=r"batching\.max_size"):
        parse_config({"batching": {"strategy": "none", "max_size": -1}})
