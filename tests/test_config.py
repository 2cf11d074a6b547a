"""Config validation: one-line errors naming the key, defaults from the schema, typed access."""

from __future__ import annotations

import copy

import pytest

from shardwise.config import load_config, load_config_file, schema, validate
from shardwise.errors import ConfigError

pytestmark = pytest.mark.unit

BASE = {
    "models": {"m": {"source": "local", "path": "/x"}},
    "generate": {"models": {"m": {}}},
}


def with_(path: str, value):
    cfg = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = cfg
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return cfg


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("generate.batch_size", "eight", "generate.batch_size: 'eight' is not of type 'integer'"),
        ("generate.shards", {"n_shards": 0}, "generate.shards.n_shards: 0 is less than the minimum of 1"),
        ("generate.sampling", {"top_p": 1.5}, "generate.sampling.top_p: 1.5 is greater than the maximum"),
        ("generate.colour", "red", "generate: unknown key 'colour'"),
        ("modles", {}, "<top level>: unknown key 'modles'"),
        ("models", {"m": {"source": "s3"}}, "models.m.source: 's3' is not one of"),
        (
            "models",
            {"m": {"source": "package", "package": "x"}},
            "models.m: source 'package' needs key(s) file",
        ),
        ("generate.models", {"run": {"model": "nope"}}, "generate.models.run: unknown model 'nope'"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(path, value, expected):
    with pytest.raises(ConfigError) as err:
        load_config(with_(path, value), source="my.yaml")
    message = str(err.value)
    assert message.startswith("my.yaml: ")
    assert expected in message
    assert "\n" not in message


def test_defaults_are_filled_from_the_schema():
    cfg = load_config(BASE)
    assert cfg.generate.shards.n_shards == 1
    assert cfg.generate.shards.chunk_size == 256
    assert cfg.generate.runs["m"].sampling.top_k == 0
    assert cfg.generate.runs["m"].sampling.top_p == 0.9
    assert cfg.models["m"].dtype == "auto"
    assert cfg.resolved["generate"]["batch_size"] == 32


def test_runs_inherit_shared_sampling_and_override_it():
    raw = copy.deepcopy(BASE)
    raw["generate"]["sampling"] = {"temperature": 0.7, "samples_per_prompt": 3}
    raw["generate"]["models"] = {"cold": {"model": "m"}, "hot": {"model": "m", "temperature": 1.3}}
    cfg = load_config(raw)
    assert cfg.generate.runs["cold"].sampling.temperature == 0.7
    assert cfg.generate.runs["hot"].sampling.temperature == 1.3
    assert cfg.generate.runs["hot"].sampling.samples_per_prompt == 3
    assert cfg.generate.runs["hot"].model == "m"


def test_validate_does_not_mutate_its_input():
    raw = copy.deepcopy(BASE)
    validate(raw)
    assert raw == BASE


def test_every_schema_key_has_description_and_default():
    def walk(node, path):
        for key, sub in node.get("properties", {}).items():
            where = f"{path}.{key}".lstrip(".")
            assert "description" in sub, f"{where} has no description"
            if "$ref" not in sub and key not in ("source", "id", "path", "package", "file", "model"):
                assert "default" in sub, f"{where} has no default"
            walk(sub, where)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            walk(extra, path + ".<name>")

    root = schema()
    walk(root, "")
    for name, sub in root["definitions"].items():
        walk(sub, name)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config_file(bad)


def test_job_shards_cover_all_shards():
    cfg = load_config(with_("generate.shards", {"n_shards": 10, "shards_per_job": 4}))
    spec = cfg.generate.shards
    assert spec.n_jobs == 3
    assert [spec.job_shards(j) for j in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def _schema_node(path: str) -> dict:
    from shardwise.config import schema

    root = schema()
    node = root
    for part in path.split("/"):
        node = node["additionalProperties"] if part == "*" else node[part]
        while "$ref" in node:
            target = root
            for ref in node["$ref"].removeprefix("#/").split("/"):
                target = target[ref]
            node = target
    return node


# dataclass, its schema node, {schema key: field} where the typed config names it otherwise,
# fields that are no key (derived), schema keys folded into other fields.
MIRRORS: list[tuple[str, str, dict[str, str], set[str], set[str]]] = [
    ("Config", "", {}, {"resolved"}, set()),
    ("ModelSpec", "properties/models/*", {}, {"name"}, set()),
    ("GenerateConfig", "properties/generate", {"models": "runs"}, set(), {"sampling"}),
    ("Sampling", "definitions/sampling", {}, set(), set()),
    ("VllmConfig", "properties/generate/properties/vllm", {}, set(), set()),
    ("TeacherLogitsConfig", "properties/teacher_logits", {}, set(), set()),
    ("ProbesConfig", "properties/probes", {}, set(), set()),
    ("AnalysisConfig", "properties/analysis", {}, set(), set()),
    ("FluencyConfig", "properties/analysis/properties/fluency", {}, set(), set()),
    ("ToxicityConfig", "properties/analysis/properties/toxicity", {}, set(), set()),
    ("ShardSpec", "definitions/shards", {}, set(), set()),
]


@pytest.mark.parametrize(
    ("name", "node", "renamed", "derived", "folded"), MIRRORS, ids=[m[0] for m in MIRRORS]
)
def test_the_typed_config_mirrors_the_schema_key_for_key(name, node, renamed, derived, folded):
    """Each dataclass has one field per key of its schema section (generate.models becomes `runs`,
    each with its sampling resolved), so the schema stays the one place keys are defined."""
    import dataclasses

    import shardwise.config as config

    fields = {f.name for f in dataclasses.fields(getattr(config, name))} - derived
    keys = set((_schema_node(node) if node else config.schema())["properties"]) - folded
    assert fields == {renamed.get(k, k) for k in keys}
