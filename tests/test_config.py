import pytest
import yaml

from pipeline.config import Config, ConfigError, load_config


def test_demo_yaml_matches_builtin_defaults():
    with open("configs/demo.yaml") as f:
        raw = yaml.safe_load(f)
    assert Config.model_validate(raw) == Config()


def test_overrides_are_typed_and_dotted():
    cfg = load_config(None, ["soup.num_workers=8", "finetune.space.epochs=[1,2]", "output_uri=s3://b/x"])
    assert cfg.soup.num_workers == 8
    assert cfg.finetune.space.epochs == [1, 2]
    assert cfg.output_uri == "s3://b/x"


@pytest.mark.parametrize("override,field", [
    ("soup.tau=banana", "soup.tau"),
    ("soup.granularity=7", "soup.granularity"),
    ("finetune.num_trials=-1", "finetune.num_trials"),
    ("soup.optimizer=NoSuchOptimizer", "soup.optimizer"),
    ("evaluate.ingredient_dtype=float8", "evaluate.ingredient_dtype"),
    ("soup.second_pass_low=1.0", "soup.second_pass_low"),
    ("soup.second_pass_low=-0.1", "soup.second_pass_low"),
    ("soup.phase2.bounds=[1.1, 1.4]", "soup.phase2.bounds"),
    ("soup.phase2.bounds=[0.0, 1.4]", "soup.phase2.bounds"),
    ("soup.phase2.bounds=[0.7, 0.9]", "soup.phase2.bounds"),
    ("finetune.inject_failure='1'", "finetune.inject_failure"),
    ("finetune.inject_failure='1:1'", "finetune.inject_failure"),
    ("data.demo.val=0", "data.demo.val"),
    ("data.demo.train=1.0", "data.demo.train"),
    ("data.demo.upsample=0", "data.demo.upsample"),
])
def test_wrong_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert field in str(e.value) and len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("optimizer", ["NGOpt", "Cobyla"])
def test_sequential_optimizers_run_only_with_one_worker(optimizer):
    with pytest.raises(ConfigError, match=f"soup.optimizer '{optimizer}'.*soup.num_workers=4.*MetaModel") as e:
        load_config(None, [f"soup.optimizer={optimizer}", "soup.num_workers=4"])
    assert len(str(e.value).splitlines()) == 1
    assert load_config(None, [f"soup.optimizer={optimizer}", "soup.num_workers=1"]).soup.optimizer == optimizer
    assert load_config(None, ["soup.optimizer=CMA", "soup.num_workers=4"]).soup.num_workers == 4


def test_unknown_key_names_the_path(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("soup:\n  tua: 0.9\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert "soup.tua" in str(e.value) and str(p) in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("soup: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["soup.tau"])


def test_section_hash_tracks_only_its_sections():
    a = Config()
    b = load_config(None, ["soup.tau=0.99"])
    assert a.section_hash("data", "model") == b.section_hash("data", "model")
    assert a.section_hash("soup") != b.section_hash("soup")


def test_cli_reports_config_error_in_one_line(capsys):
    from pipeline.cli import main

    assert main(["prepare", "--set", "soup.tau=x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "soup.tau" in err[0]


@pytest.mark.parametrize("path", ["configs/demo.yaml", "configs/imagenet-vit-b32.yaml", "configs/model-soups-72.yaml"])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.soup.tau == 0.998 and cfg.soup.bounds_delta == 0.5


def test_imagenet_config_keeps_the_reference_search():
    cfg = load_config("configs/imagenet-vit-b32.yaml")
    assert cfg.model.name == "ViT-B-32-quickgelu" and cfg.soup.max_func_evals_per_dim == 30
    assert cfg.soup.seed == 123456789 and cfg.soup.optimizer == "NGOpt" and cfg.soup.num_workers == 1
    roles = sorted(s.role for s in cfg.data.splits.values())
    assert roles.count("ood") == 5 and "val" in roles and "id_test" in roles



@pytest.mark.parametrize("override,field,says", [
    ("console.status_every_s=0", "console.status_every_s", "greater than 0"),
    ("console.status_every_s=soon", "console.status_every_s", "valid number"),
])
def test_bad_console_values_are_refused_in_one_line(override, field, says):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    message = str(e.value)
    assert len(message.splitlines()) == 1 and f"{field}: " in message and says in message


def test_tracking_defaults():
    cfg = Config()
    assert cfg.tracking.tensorboard and cfg.tracking.tensorboard_uri is None and cfg.tracking.mlflow_uri is None
    assert cfg.tracking.mlflow_experiment == "frankensoup"
    cfg = load_config(None, ["tracking.mlflow_uri=http://mlflow:5000", "tracking.tensorboard_uri=s3://b/tb"])
    assert cfg.tracking.mlflow_uri == "http://mlflow:5000" and cfg.tracking.tensorboard_uri == "s3://b/tb"


@pytest.mark.parametrize("override,field,says", [
    ("tracking.mlflow_uri=s3://bucket/mlruns", "tracking.mlflow_uri", "an s3:// bucket only stores MLflow's artifacts"),
    ("tracking.mlflow_uri=", "tracking.mlflow_uri", "must be an MLflow tracking URI"),
    ("tracking.tensorboard_uri=gs://bucket/tb", "tracking.tensorboard_uri", "local path, file:// or s3://"),
    ("tracking.mlflow_experiment=", "tracking.mlflow_experiment", "at least 1 character"),
    ("tracking.tensorboard=maybe", "tracking.tensorboard", "boolean"),
    ("tracking.wandb=true", "tracking.wandb", "Extra inputs"),
])
def test_bad_tracking_values_are_refused_in_one_line(override, field, says):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    message = str(e.value)
    assert len(message.splitlines()) == 1 and f"{field}: " in message and says in message


@pytest.mark.parametrize("name,pretrained,right", [
    ("ViT-B-32", "openai", "ViT-B-32-quickgelu"),             # QuickGELU weights on a GELU model
    ("ViT-B-32-quickgelu", "laion2b_s34b_b79k", "ViT-B-32"),  # and the reverse
])
def test_weights_of_another_activation_are_refused_naming_the_right_model(name, pretrained, right):
    """open_clip builds ViT-B-32 with GELU and only warns when it loads OpenAI's QuickGELU weights:
    the pair is refused when the config loads, from open_clip's registry (nothing downloaded)."""
    with pytest.raises(ConfigError) as e:
        load_config("configs/imagenet-vit-b32.yaml", [f"model.name={name}", f"model.pretrained={pretrained}"])
    message = str(e.value)
    assert "\n" not in message and f"model.name {name!r}" in message and repr(pretrained) in message
    assert f"use model.name {right!r}" in message
    assert load_config("configs/imagenet-vit-b32.yaml", [f"model.name={right}", f"model.pretrained={pretrained}"])


def test_an_output_made_under_the_old_model_name_is_redone():
    """A prepare made with ViT-B-32 + openai (before the check) is not reused by the config that
    names ViT-B-32-quickgelu: the base's key, hence the zero-shot head's and every trial's, differ."""
    from pipeline.prepare import base_key, zero_shot_key

    new = load_config("configs/imagenet-vit-b32.yaml")
    old = new.model_copy(update={"model": new.model.model_construct(**{**dict(new.model), "name": "ViT-B-32"})})
    assert new.model.name == "ViT-B-32-quickgelu" and old.model.name == "ViT-B-32"
    assert base_key(old) != base_key(new)
    assert zero_shot_key(old, base_key(old), ["a"]) != zero_shot_key(new, base_key(new), ["a"])
