"""finetune.init: linear_probe: a head trained once on frozen train features, stored under
output_uri keyed by what it read, the start of every trial."""
from conftest import clone_output

from pipeline import layout, storage
from pipeline.model import load_classifier

# lr so small that one epoch of AdamW leaves every weight as it was: the ingredient is its start
FROZEN_TRIAL = ("finetune.init=linear_probe", "finetune.num_trials=1", "finetune.space.lr=[1.0e-30,1.0e-30]")


def test_the_default_start_is_zero_shot_and_probe_settings_key_nothing(prepared_demo, tmp_path):
    from pipeline.finetune.sweep import trial_plan, trial_setup, training_settings

    cfg = clone_output(prepared_demo, tmp_path / "out")
    assert cfg.finetune.init == "zero_shot"
    assert trial_setup(cfg)["start_uri"] == layout.zeroshot_uri(cfg)
    assert not {"init", "linear_probe"} & set(training_settings(cfg))
    other = clone_output(prepared_demo, tmp_path / "other", "finetune.linear_probe.epochs=3")
    assert [t["key"] for t in trial_plan(cfg)] == [t["key"] for t in trial_plan(other)]


def test_linear_probe_is_trained_once_started_from_reused_and_redone_on_change(ray_local, prepared_demo, tmp_path):
    from pipeline.dryrun import _trials_to_train
    from pipeline.finetune.linear_probe import ensure_probe
    from pipeline.finetune.sweep import run_finetune, trial_plan

    cfg = clone_output(prepared_demo, tmp_path / "out", *FROZEN_TRIAL)
    lines: list[str] = []
    registry = run_finetune(cfg, log=lines.append)
    record = storage.read_json(layout.probe_record_uri(cfg))
    assert any("linear probe trained" in line for line in lines)
    # the probe fits the train features better than the zero-shot head it started from
    assert record["train_acc"] > record["zero_shot_train_acc"]
    assert record["sha256"] == storage.sha256(storage.read_bytes(layout.probe_uri(cfg)))
    probe, _ = load_classifier(layout.probe_uri(cfg))
    zero_shot, _ = load_classifier(layout.zeroshot_uri(cfg))
    assert not probe.head.weight.equal(zero_shot.head.weight)
    assert probe.visual.state_dict().keys() == zero_shot.visual.state_dict().keys()
    assert all(v.equal(zero_shot.visual.state_dict()[k]) for k, v in probe.visual.state_dict().items())

    # the trial started from the stored probe head (its lr leaves every weight where it started)
    ingredient, _ = load_classifier(registry["ingredients"][0]["checkpoint_uri"])
    assert ingredient.head.weight.equal(probe.head.weight) and ingredient.head.bias.equal(probe.head.bias)

    # a rerun reuses the probe (same file) and the trial keyed by it
    before = storage.read_bytes(layout.probe_uri(cfg))
    lines.clear()
    run_finetune(cfg, log=lines.append)
    assert any("linear probe reused" in line for line in lines)
    assert storage.read_bytes(layout.probe_uri(cfg)) == before
    assert layout.read_marker(cfg, "finetune")["reused"] == 1
    assert layout.read_marker(cfg, "finetune")["linear_probe"]["reused"] is True

    # a changed probe setting redoes the probe, and with it every trial's key
    changed = clone_output(cfg, tmp_path / "changed", *FROZEN_TRIAL, "finetune.linear_probe.epochs=3")
    assert trial_plan(changed)[0]["key"] != trial_plan(cfg)[0]["key"]  # the old probe is not current
    assert _trials_to_train(changed) == "; 1 to train, 0 reused; the linear probe trained first"  # the dry run
    new = ensure_probe(changed, log=lines.append)
    assert new["reused"] is False and new["key"] != record["key"] and new["sha256"] != record["sha256"]
    assert trial_plan(changed)[0]["key"] not in {t["key"] for t in trial_plan(cfg)}


def test_the_probe_is_the_same_bits_when_trained_again(prepared_demo):
    from pipeline.finetune.linear_probe import fit_probe, probe_settings
    from pipeline.finetune.sweep import trial_setup

    setup = {**trial_setup(prepared_demo), "start_uri": layout.zeroshot_uri(prepared_demo)}
    first, again = (fit_probe(setup, probe_settings(prepared_demo)) for _ in range(2))
    assert first["weight"].equal(again["weight"]) and first["bias"].equal(again["bias"])
    assert first["train_acc"] == again["train_acc"]
