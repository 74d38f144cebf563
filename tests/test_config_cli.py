"""`frankensoup config show | validate | schema`, field descriptions, "did you mean", ${VAR} in
YAML and credentials hidden in what is stored. None of this starts Ray."""
import json
import subprocess
import sys

import pytest
import yaml

from pipeline import methodspec
from pipeline.cli import main
from pipeline.config import Config, ConfigError, load_config, redact, redacted


def _properties(schema: dict):
    """(model, field, its schema with a $ref resolved) for every field of every model."""
    defs = schema.get("$defs", {})
    for model_name, model in [("Config", schema), *defs.items()]:
        for field, prop in model.get("properties", {}).items():
            ref = prop.get("$ref") or next((a["$ref"] for a in prop.get("anyOf", []) if "$ref" in a), None)
            target = defs[ref.rsplit("/", 1)[-1]] if ref else {}
            yield model_name, field, prop, target


def test_every_field_has_a_description():
    """Every field, the soup methods' own settings included (pipeline/methodspec.py)."""
    schema = methodspec.json_schema(Config.model_json_schema())
    missing = [f"{m}.{f}" for m, f, prop, target in _properties(schema)
               if not (prop.get("description") or target.get("description"))]
    assert missing == []
    fields = {(m, f): prop.get("description", "") for m, f, prop, _ in _properties(schema)}
    assert fields[("SoupConfig", "num_workers")] == "W: candidate mixtures in flight per optimizer step (changes the search)."
    assert len(fields) > 80


def test_config_commands_start_no_ray(tmp_path):
    """show, validate and schema in a fresh interpreter: Ray is never even imported."""
    code = ("import sys; from pipeline.cli import main\n"
            "for action in ('show', 'validate', 'schema'):\n"
            "    assert main(['config', action, '--set', 'soup.tau=0.9']) == 0\n"
            "assert 'ray' not in sys.modules, 'ray imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "tau: 0.9" in out.stdout and "ok: the default config" in out.stdout


def test_schema_is_the_models_json_schema(capsys):
    assert main(["config", "schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == methodspec.json_schema(Config.model_json_schema())
    assert "soup" in printed["properties"] and "SoupConfig" in printed["$defs"]
    # the settings each soup method declared are in it, under soup.methods.<name>
    methods = printed["$defs"]["SoupMethods"]["properties"]
    assert {"mmms", "model_stock", "lines", "wise_ft"} <= set(methods)
    assert printed["$defs"]["SoupConfig"]["properties"]["methods"]["$ref"] == "#/$defs/SoupMethods"


def test_show_prints_the_resolved_config_after_set(capsys):
    assert main(["config", "show", "--config", "imagenet-vit-b32", "--set", "soup.num_evaluators=8"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["soup"]["num_evaluators"] == 8 and shown["model"]["name"] == "ViT-B-32-quickgelu"
    # every default filled in, and it loads back to the same config
    assert Config.model_validate(shown) == load_config("configs/imagenet-vit-b32.yaml", ["soup.num_evaluators=8"])


def test_validate_prints_one_line_per_problem(capsys):
    assert main(["config", "validate", "--set", "soup.tua=1", "--set", "finetune.num_trails=3",
                 "--set", "soup.tau=x"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert "soup.tua: Extra inputs are not permitted (did you mean soup.tau?)" in lines
    assert "finetune.num_trails: Extra inputs are not permitted (did you mean finetune.num_trials?)" in lines
    assert any(line.startswith("soup.tau: Input should be a valid number") for line in lines)


@pytest.mark.parametrize("key,suggestion", [
    ("soup.tua", "soup.tau"),
    ("outptu_uri", "output_uri"),
    ("soup.phase2.evals_per_dims", "soup.phase2.evals_per_dim"),
    ("data.splits.val.rol", "data.splits.val.role"),
    ("tracking.mlflow_url", "tracking.mlflow_uri"),
])
def test_unknown_key_gets_did_you_mean(key, suggestion):
    extra = ["data.splits.val={uri: /x, role: val}"] if key.startswith("data.splits") else []
    with pytest.raises(ConfigError) as e:
        load_config(None, [*extra, f"{key}=1"])
    assert f"{key}: Extra inputs are not permitted (did you mean {suggestion}?)" in str(e.value)


def test_unknown_key_far_from_any_gets_no_suggestion():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["soup.zzzzzz=1"])
    assert "soup.zzzzzz: Extra inputs are not permitted" in str(e.value) and "did you mean" not in str(e.value)


def test_env_variables_in_yaml(tmp_path, monkeypatch):
    p = tmp_path / "c.yaml"
    p.write_text("output_uri: s3://${BUCKET}/run\nsoup: {num_workers: '${W:-3}', optimizer: '${OPT:-CMA}'}\n"
                 "model: {name: '${NAME:-}x'}\n")
    monkeypatch.setenv("BUCKET", "b1")
    monkeypatch.setenv("OPT", "TwoPointsDE")
    monkeypatch.delenv("W", raising=False)
    monkeypatch.delenv("NAME", raising=False)
    cfg = load_config(str(p))
    assert cfg.output_uri == "s3://b1/run" and cfg.soup.num_workers == 3 and cfg.soup.optimizer == "TwoPointsDE"
    assert cfg.model.name == "x"
    monkeypatch.setenv("W", "")  # set but empty: the default, as in the shell
    assert load_config(str(p)).soup.num_workers == 3
    monkeypatch.delenv("BUCKET")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert "output_uri: environment variable BUCKET is not set" in str(e.value) and str(p) in str(e.value)
    assert len(str(e.value).splitlines()) == 1


def test_imagenet_bucket_is_one_env_variable(monkeypatch):
    monkeypatch.setenv("FRANKENSOUP_BUCKET", "my-bucket")
    for path in ("configs/imagenet-vit-b32.yaml", "configs/model-soups-72.yaml"):
        cfg = load_config(path)
        uris = [cfg.output_uri] + [s.uri for s in cfg.data.splits.values()]
        uris += [s.objectnet_mappings for s in cfg.data.splits.values() if s.objectnet_mappings]
        assert len(uris) == 10 and all(u.startswith("s3://my-bucket/") for u in uris), uris


@pytest.mark.parametrize("text,hidden", [
    ("https://user:secret@mlflow.example.com:5000/x", "https://***@mlflow.example.com:5000/x"),
    ("https://token@host/path", "https://***@host/path"),
    ("ray://admin:p%40ss@head:10001", "ray://***@head:10001"),
    ("s3://bucket/path/with@at", "s3://bucket/path/with@at"),
    ("http://mlflow:5000", "http://mlflow:5000"),
    ("./frankensoup-output", "./frankensoup-output"),
])
def test_redact(text, hidden):
    assert redact(text) == hidden


def test_shown_and_stored_config_hides_credentials(capsys):
    sets = ["tracking.mlflow_uri=https://me:s3cr3t@mlflow.example.com", "ray.address=ray://u:pw0rd@head:10001"]
    dump = redacted(load_config(None, sets))
    assert dump["tracking"]["mlflow_uri"] == "https://***@mlflow.example.com"
    assert dump["ray"]["address"] == "ray://***@head:10001"
    assert main(["config", "show", *sum((["--set", s] for s in sets), [])]) == 0
    out = capsys.readouterr().out
    assert "s3cr3t" not in out and "pw0rd" not in out and "https://***@mlflow.example.com" in out
