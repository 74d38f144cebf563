"""The finetune stage: the trial loop resumes exactly, a sweep writes the registry and retries
an injected failure from its checkpoint, a killed sweep on s3 is restored instead of restarted,
and existing checkpoints (model-soups ViT-B/32 layout included) are imported or refused."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from conftest import TINY_OVERRIDES, clone_output, tiny_config, upload
from pipeline import layout, storage
from pipeline.model import CheckpointError, load_classifier

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trial_config(cfg, trial=0, **hparams):
    from pipeline.finetune.sweep import trial_setup

    return {"trial": trial, "lr": 1e-3, "weight_decay": 0.05, "epochs": 2, "label_smoothing": 0.1,
            "randaugment_magnitude": 5, "mix_prob": 0.5, **hparams, "setup": trial_setup(cfg)}


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_a_resumed_trial_replays_the_uninterrupted_one(prepared_demo, tmp_path, loader):
    from pipeline.finetune.trainable import InjectedFailure, run_trial

    def trial_config_(cfg):
        config = trial_config(cfg)
        config["setup"].update(loader=loader, loader_workers=2, shuffle_buffer=64,
                               # model soups' crop and flip draw from torch's generator too: replayed
                               train_crop="random_resized_flip" if loader == "stream" else "center")
        return config

    def keep(into):
        def report(metrics, ckpt_dir):
            into.append(metrics)
            shutil.copytree(ckpt_dir, tmp_path / f"{id(into)}-{metrics['epoch']}")
        return report

    whole, broken, resumed = [], [], []
    run_trial(trial_config_(prepared_demo), keep(whole))
    config = trial_config_(prepared_demo)
    config["setup"]["inject_failure"] = "0:2"
    with pytest.raises(InjectedFailure):
        run_trial(config, keep(broken))
    assert [m["epoch"] for m in broken] == [1]
    run_trial(config, keep(resumed), resume_dir=str(tmp_path / f"{id(broken)}-1"))

    assert [m["epoch"] for m in resumed] == [2] and resumed[0]["restored_from_epoch"] == 1
    assert resumed[0]["val_acc"] == whole[-1]["val_acc"]
    # resumed at its last checkpoint (a finished trial Tune had not recorded): trains nothing
    again = []
    run_trial(config, lambda metrics, ckpt: again.append((metrics, ckpt)), resume_dir=str(tmp_path / f"{id(whole)}-2"))
    assert [(m["epoch"], m["restored_from_epoch"], m["val_acc"], ckpt) for m, ckpt in again] == \
        [(2, 2, whole[-1]["val_acc"], None)]

    a, _ = load_classifier(str(tmp_path / f"{id(whole)}-2" / "model.safetensors"))
    b, _ = load_classifier(str(tmp_path / f"{id(resumed)}-2" / "model.safetensors"))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_streamed_train_images_are_every_row_once_shuffled_across_shards(prepared_demo, tmp_path):
    """Streaming reads a class-sorted split (as an image-folder import writes it) shard by shard,
    yet each epoch gives every image once, batches mixing classes, in an order fixed by
    (seed, epoch): the memory path's pixels, only the order differs."""
    from pipeline.data.shards import read_split, write_split
    from pipeline.finetune.train_set import StreamTrain
    from pipeline.finetune.trainable import decode_uint8, uint8_transform
    from pipeline.prepared import load_zero_shot

    _, train = layout.split_of_role(prepared_demo, "train")
    split = read_split(train.uri)
    labels = np.array(split.table.column("label").to_pylist())
    by_class = np.argsort(labels, kind="stable")
    sorted_uri = str(tmp_path / "sorted")
    write_split(sorted_uri, [split.table.column("image")[int(i)].as_py() for i in by_class], labels[by_class].tolist(),
                name="sorted", role="train", class_names=split.class_names, rows_per_shard=40)
    _, meta = load_zero_shot(prepared_demo)
    transform, _, _ = uint8_transform(meta["preprocess"])
    kept_x, kept_y = decode_uint8(sorted_uri, meta["preprocess"])

    def epoch(seed, e, workers=2):
        stream = StreamTrain(sorted_uri, transform, seed=seed, workers=workers, buffer=128)
        assert len(stream) == len(labels)
        return list(stream.batches(50, e))

    def rows(batches):
        """Each image as (label, its pixels' bytes)."""
        return [(int(y), x.numpy().tobytes()) for xs, ys in batches for x, y in zip(xs, ys)]

    first = epoch(7, 1)
    assert [len(y) for _, y in first] == [50] * (len(labels) // 50) + ([len(labels) % 50] if len(labels) % 50 else [])
    assert all(x.dtype == torch.uint8 and x.shape[1:] == kept_x.shape[1:] for x, _ in first)
    assert sorted(rows(first)) == sorted((int(y), x.numpy().tobytes()) for x, y in zip(kept_x, kept_y))
    # the sorted split holds ~60 images a class: a batch drawn in file order would hold one or two
    assert min(len(set(y.tolist())) for _, y in first[:-1]) >= 5
    assert rows(epoch(7, 1)) == rows(first)              # replayable: what a resumed epoch needs
    assert rows(epoch(7, 2)) != rows(first) != rows(epoch(8, 1))
    assert sorted(rows(epoch(7, 1, workers=0))) == sorted(rows(first))


def test_auto_loader_streams_what_would_not_fit_the_memory_limit(prepared_demo):
    from pipeline.finetune.train_set import MemoryTrain, StreamTrain
    from pipeline.finetune.sweep import trial_setup
    from pipeline.finetune.trainable import image_shape, train_images
    from pipeline.prepared import load_zero_shot

    _, meta = load_zero_shot(prepared_demo)
    setup = trial_setup(prepared_demo)
    n = storage.read_json(storage.join(setup["train_uri"], "dataset.json"))["num_rows"]
    need_gb = n * int(np.prod(image_shape(meta["preprocess"]))) / 2**30
    assert setup["loader"] == "auto"
    for limit, kind in [(need_gb * 1.01, MemoryTrain), (need_gb * 0.99, StreamTrain)]:
        assert type(train_images({**setup, "memory_limit_gb": limit}, meta["preprocess"], seed=0)) is kind


def test_a_train_split_streamed_unshuffled_is_refused_before_any_training(prepared_demo, tmp_path):
    """dataset.json records how rows were ordered; a train split the stage would stream shard by
    shard without that order being shuffled is refused in one line, nothing trained or written.
    Kept in memory (the memory loader shuffles it all), the same split is fine."""
    from pipeline.finetune.sweep import FinetuneError, check_train_order, run_finetune
    from pipeline.prepared import load_zero_shot

    cfg = clone_output(prepared_demo, tmp_path / "out", "finetune.loader=stream")
    with pytest.raises(FinetuneError) as e:
        run_finetune(cfg, log=lambda *_: None)
    message = str(e.value)
    assert "\n" not in message and "train split 'train'" in message and "--shuffle-seed" in message
    assert "order: not recorded" in message
    assert not storage.exists(layout.registry_uri(cfg)) and not storage.exists(storage.join(cfg.output_uri, "finetune"))
    preprocess = load_zero_shot(cfg)[1]["preprocess"]
    check_train_order(clone_output(prepared_demo, tmp_path / "mem", "finetune.loader=memory"), preprocess)
    marker = storage.join(layout.split_of_role(cfg, "train")[1].uri, "dataset.json")
    storage.write_json(marker, {**storage.read_json(marker), "order": "folders"})
    with pytest.raises(FinetuneError, match="order: folders"):
        check_train_order(cfg, preprocess)
    storage.write_json(marker, {**storage.read_json(marker), "order": "shuffled", "shuffle_seed": 0})
    check_train_order(cfg, preprocess)


def test_randaugment_magnitudes_are_on_timm_scale():
    """timm's rand-m{M}: M/10 of each op's largest change, M above 10 counted as 10; torchvision's
    bin b of 31 is b/30 of the same ranges. The demo's 1.67 and 3.33 are the bins 5 and 10 it
    always used (torchvision's magnitude 10 was about timm's 3.3)."""
    from timm.data import auto_augment as timm_aa
    from torchvision.transforms import v2

    from pipeline.finetune.trainable import build_augment, randaugment_bin

    space = v2.RandAugment._AUGMENTATION_SPACE
    timm_level = {"Rotate": timm_aa._rotate_level_to_arg, "ShearX": timm_aa._shear_level_to_arg,
                  "Brightness": timm_aa._enhance_increasing_level_to_arg}
    for m in (1, 4, 7, 10):
        b = randaugment_bin(m)
        for op, level in timm_level.items():
            ours = float(space[op][0](31, 224, 224)[b])
            theirs = abs(level(m, {})[0] - (1.0 if op == "Brightness" else 0.0))
            assert abs(ours - theirs) < 1e-6, (op, m)
    assert [randaugment_bin(m) for m in (0, 1.67, 3.33, 10, 12, 20)] == [0, 5, 10, 30, 30, 30]
    demo = build_augment(3.33)
    assert (demo.num_ops, demo.magnitude, demo.num_magnitude_bins) == (2, 10, 31)  # the demo's RandAugment
    assert build_augment(0, 2) is None and build_augment(5, 0) is None


def test_random_resized_crop_and_flip_keep_the_size_and_replay_from_the_seed():
    from pipeline.finetune.trainable import build_augment

    image = torch.arange(3 * 32 * 32, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, 32, 32)
    augment = build_augment(9, 2, "random_resized_flip", (32, 32))

    def draw(seed):
        torch.manual_seed(seed)
        return [augment(image) for _ in range(4)]

    first = draw(0)
    assert all(x.shape == image.shape and x.dtype == torch.uint8 for x in first)
    assert all(not torch.equal(x, image) for x in first)
    assert all(torch.equal(a, b) for a, b in zip(first, draw(0)))  # torch's generator: a resume replays it
    assert not all(torch.equal(a, b) for a, b in zip(first, draw(1)))
    flip_only = build_augment(0, 0, "random_resized_flip", (32, 32))
    assert flip_only is not None and flip_only(image).shape == image.shape


def test_imagenet_configs_sweep_model_soups_ranges():
    """hparam_info.json of model soups' 72 models: lr 1e-6..1e-4, weight decay 8e-5..0.53, epochs
    4..16, label smoothing 0..0.23, mixup 0..0.88, RandAugment m 0..20 and n 0..2."""
    from pipeline.config import load_config
    from pipeline.finetune.sweep import trial_hparams

    for path in ("configs/imagenet-vit-b32.yaml", "configs/model-soups-72.yaml"):
        cfg = load_config(path)
        space = cfg.finetune.space
        assert space.lr == (1e-6, 1e-4) and space.weight_decay == (8e-5, 0.53)
        assert sorted(set(space.epochs)) == list(range(4, 17))
        assert (min(space.label_smoothing), max(space.label_smoothing)) == (0.0, 0.23)
        assert (min(space.mix_prob), max(space.mix_prob)) == (0.0, 0.88)
        assert sorted(set(space.randaugment_magnitude)) == list(range(0, 21))
        assert sorted(set(space.randaugment_ops)) == [0, 1, 2]
        assert cfg.finetune.train_crop == "random_resized_flip"
    hp = [trial_hparams(cfg, t) for t in range(72)]
    assert all(1e-6 <= h["lr"] <= 1e-4 and 8e-5 <= h["weight_decay"] <= 0.53 for h in hp)
    assert {h["randaugment_ops"] for h in hp} == {0, 1, 2}


def trial_checkpoints(experiment_dir: str, trial_id: str) -> dict[str, dict]:
    """Checkpoint name -> its state.json, for the trial Tune calls ``trial_id``. Checkpoints
    are the trial's own record: workers write them before reporting (Tune's result.json is
    the driver's, and may miss a row reported just before a crash)."""
    [trial_dir] = [d for d in storage.listdir(experiment_dir) if d.startswith(f"train_ingredient_{trial_id}_")]
    folder = storage.join(experiment_dir, trial_dir)
    return {name: storage.read_json(storage.join(folder, name, "state.json"))
            for name in storage.listdir(folder) if name.startswith("checkpoint_")}


def final_state(experiment_dir: str, trial_id: str) -> dict:
    checkpoints = trial_checkpoints(experiment_dir, trial_id)
    return checkpoints[max(checkpoints)]


def test_sweep_registers_ingredients_and_resumes_a_failed_trial(ray_local, prepared_demo, tmp_path, capsys):
    from pipeline.finetune import read_registry
    from pipeline.finetune.sweep import experiment_location, run_finetune, trial_plan

    # quoted: YAML reads a bare 1:2 as the number 62
    cfg = clone_output(prepared_demo, tmp_path / "out", "finetune.space.epochs=[2]",
                       "finetune.inject_failure='1:2'", "finetune.max_failures=1")
    registry = run_finetune(cfg)

    assert [r["id"] for r in registry["ingredients"]] == ["ft-000", "ft-001"]
    assert registry == read_registry(cfg)
    for row in registry["ingredients"]:
        data = storage.read_bytes(row["checkpoint_uri"])
        assert storage.sha256(data) == row["sha256"] and row["status"] == "ok" and row["source"] == "tune"
        clf, meta = load_classifier(row["checkpoint_uri"])
        assert meta["hparams"] == row["hparams"] and meta["epoch"] == 2 and 0 < row["val_acc"] <= 1
    assert layout.read_marker(cfg, "finetune")["computed"] == 2
    assert_tracked(cfg, ["ft-000", "ft-001"])

    experiment = experiment_location(cfg, trial_plan(cfg))[2]
    ft0, ft1 = (final_state(experiment, r["trial_id"])["metrics"] for r in registry["ingredients"])
    # trial 1 failed at the start of epoch 2 and its retry went on from the epoch-1 checkpoint
    assert (ft1["epoch"], ft1["restored_from_epoch"]) == (2, 1)
    assert (ft0["epoch"], ft0["restored_from_epoch"]) == (2, 0)
    assert ft1["val_acc"] == registry["ingredients"][1]["val_acc"]

    capsys.readouterr()
    assert run_finetune(cfg) == registry
    assert "finetune: 2 reused, 0 trained" in capsys.readouterr().out


def assert_tracked(cfg, ids: list[str]) -> None:
    """Each trained ingredient has TensorBoard event files under output_uri (tracking's default)."""
    board = storage.join(cfg.output_uri, "tracking", "tensorboard", "finetune")
    runs = storage.listdir(board)
    assert [r[:6] for r in runs] == ids
    for run in runs:
        assert any(n.startswith("events.out.tfevents.") for n in storage.listdir(storage.join(board, run)))


def finetune_command(output_uri: str, *extra: str) -> list[str]:
    sets = [*TINY_OVERRIDES, f"output_uri={output_uri}", *extra]
    return [sys.executable, "-m", "pipeline", "finetune"] + [a for s in sets for a in ("--set", s)]


def test_a_killed_sweep_on_s3_is_restored_not_restarted(prepared_demo, s3_bucket):
    from pipeline.finetune import read_registry

    out = f"{s3_bucket}/killed-sweep"
    upload(prepared_demo.output_uri, out)
    # a short lease TTL: the rerun takes over the killed driver's lease once its heartbeat is
    # 10 s old, not after the default minute
    extra = ["finetune.num_trials=2", "finetune.max_concurrent=1", "finetune.space.epochs=[2]",
             "storage.lease_ttl_s=10"]
    cfg = tiny_config(out, *extra)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONUNBUFFERED"] = "1"  # so we see Tune's lines as they come

    proc = subprocess.Popen(finetune_command(out, *extra), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    watchdog = threading.Timer(240, os.killpg, (proc.pid, signal.SIGKILL))  # never hang the suite
    watchdog.start()
    finished, lines = None, []
    try:
        for line in proc.stdout:
            lines.append(line)
            found = re.search(r"finetune: ft-\d+ finished .*Tune trial (\S+)\)", line)
            if found:
                finished = found.group(1)
                break
        time.sleep(2)  # let the driver record the finished trial, as a crash a moment later would
    finally:
        watchdog.cancel()
        with contextlib.suppress(ProcessLookupError):  # the watchdog may have done it
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, like a crash
        proc.wait()
    assert finished, "".join(lines[-30:])
    assert layout.read_marker(cfg, "finetune") is None
    from pipeline.finetune.sweep import experiment_name, trial_plan

    experiment = storage.join(layout.tune_storage(cfg), experiment_name(trial_plan(cfg)))
    before = trial_checkpoints(experiment, finished)

    rerun = subprocess.run(finetune_command(out, *extra), cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "restoring the interrupted sweep" in rerun.stdout
    assert "took over the lease" in rerun.stdout, rerun.stdout[-3000:]  # the killed driver's

    registry = read_registry(cfg)
    assert [r["id"] for r in registry["ingredients"]] == ["ft-000", "ft-001"]
    assert_tracked(cfg, ["ft-000", "ft-001"])
    by_trial = {r["trial_id"]: r for r in registry["ingredients"]}
    # the finished trial was kept, not retrained: the same checkpoints, nothing new, and its
    # registered result is the one it had before the kill
    assert trial_checkpoints(experiment, finished) == before
    last = before[max(before)]["metrics"]
    assert (last["epoch"], last["restored_from_epoch"]) == (2, 0)
    assert by_trial[finished]["val_acc"] == last["val_acc"]


# ---- import-ingredients --------------------------------------------------------------------

def test_import_registers_our_own_checkpoints(prepared_demo, tmp_path):
    from pipeline.finetune import import_ingredients, read_registry
    from pipeline.layout import zeroshot_uri

    cfg = clone_output(prepared_demo, tmp_path / "out")
    clf, _ = load_classifier(zeroshot_uri(cfg))
    plain = tmp_path / "plain_state.safetensors"  # a bare state dict, no metadata
    storage.save_tensors(str(plain), clf.state_dict())
    lines = []
    registry = import_ingredients(cfg, [zeroshot_uri(cfg), str(plain)], log=lines.append)
    assert not any("warning" in line for line in lines)  # the demo's val is no random holdout

    rows = registry["ingredients"]
    assert [r["id"] for r in rows] == ["zeroshot", "plain_state"]
    assert rows[0]["val_acc"] == rows[1]["val_acc"] > 0  # the same weights, the same accuracy
    assert read_registry(cfg) == registry and {r["source"] for r in rows} == {"import"}
    imported, meta = load_classifier(rows[1]["checkpoint_uri"])
    assert meta["source"] == "import" and torch.equal(imported.head.weight, clf.head.weight)


def test_import_refuses_a_checkpoint_of_another_architecture(prepared_demo, tmp_path):
    from pipeline.finetune import import_ingredients
    from pipeline.model import init_classifier, model_config
    from pipeline.layout import zeroshot_uri

    cfg = clone_output(prepared_demo, tmp_path / "out")
    wider = model_config(cfg.model.name)
    wider = {**wider, "vision_cfg": {**wider["vision_cfg"], "width": 32}}
    bad = tmp_path / "wider.safetensors"
    storage.save_tensors(str(bad), init_classifier(cfg.model.name, 10, wider).state_dict())

    with pytest.raises(CheckpointError, match=r"wider\.safetensors.*wrong shape"):
        import_ingredients(cfg, [zeroshot_uri(cfg), str(bad)])
    # checked before anything was written
    assert not storage.exists(layout.registry_uri(cfg))
    assert not storage.exists(layout.stage_dir(cfg, "finetune"))

    soups_like = tmp_path / "no_head.pt"
    torch.save({"model.visual.conv1.weight": torch.zeros(3)}, soups_like)
    with pytest.raises(CheckpointError, match="no_head.pt"):
        import_ingredients(cfg, [str(soups_like)])


def vit_b32_prepared(tmp_path, class_names):
    """A prepared output for ViT-B-32 on four tiny images: the shards, and a zero-shot
    checkpoint of the right architecture and classes (made without any download)."""
    from pipeline.config import load_config
    from pipeline.data import encode_png, write_split
    from pipeline.model import init_classifier, save_classifier
    from pipeline.layout import zeroshot_uri

    out = tmp_path / "vit"
    rng = np.random.default_rng(0)
    sets = []
    for role in ("train", "val", "id_test"):
        uri = str(out / "data" / role)
        write_split(uri, [encode_png(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(4)],
                    [0, 1, 0, 1], name=role, role=role, class_names=class_names)
        sets += [f"data.splits.{role}.uri={uri}", f"data.splits.{role}.role={role}"]
    cfg = load_config(None, [f"output_uri={out}", "model.name=ViT-B-32-quickgelu", "model.pretrained=openai",
                             "data.source=shards", *sets])
    preprocess = {"size": 224, "mean": [0.48145466, 0.4578275, 0.40821073],
                  "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic", "resize_mode": "shortest"}
    save_classifier(zeroshot_uri(cfg), init_classifier(cfg.model.name, len(class_names)), model_name=cfg.model.name,
                    class_names=class_names, preprocess=preprocess)
    data = storage.read_bytes(zeroshot_uri(cfg))
    storage.write_json(layout.zeroshot_record_uri(cfg), {"key": "test", "sha256": storage.sha256(data),
                                                         "id_test_accuracy": 0.0})
    return cfg


def test_import_warns_in_one_line_when_val_is_our_own_random_holdout(prepared_demo, tmp_path):
    """Ingredients trained elsewhere (model soups' on ImageNet minus their fixed 2 %) most likely
    trained on a val that import-images drew at random: said in one line; not with the
    reference's indices (--holdout-indices)."""
    from pipeline.finetune import import_ingredients
    from pipeline.layout import zeroshot_uri

    cfg = clone_output(prepared_demo, tmp_path / "out")
    marker = storage.join(layout.split_of_role(cfg, "val")[1].uri, "dataset.json")
    info = storage.read_json(marker)
    said = {}
    for method, held in [("random", {"method": "random", "fraction": 0.02, "seed": 0}),
                         ("indices", {"method": "indices", "file": "imagenet_98_idxs.npy"})]:
        storage.write_json(marker, {**info, "holdout": held})
        lines = []
        import_ingredients(cfg, [zeroshot_uri(cfg)], replace=True, log=lines.append)
        said[method] = [line for line in lines if "warning" in line]
    assert said["indices"] == [] and len(said["random"]) == 1
    assert "random 0.02 holdout" in said["random"][0] and "--holdout-indices" in said["random"][0]


def test_import_maps_the_model_soups_vit_b32_layout(tmp_path):
    import open_clip

    from pipeline.finetune import import_ingredients

    torch.manual_seed(0)
    cfg = vit_b32_prepared(tmp_path, ["cat", "dog"])
    clip = open_clip.create_model("ViT-B-32-quickgelu")  # random init, no download
    # model-soups' ModelWrapper: the CLIP as `model` (its text transformer deleted) + the head
    state = {f"model.{k}": v for k, v in clip.state_dict().items() if not k.startswith("transformer.")}
    state["classification_head.weight"] = torch.randn(2, 512)
    state["classification_head.bias"] = torch.randn(2)
    torch.save(state, tmp_path / "model_7.pt")

    registry = import_ingredients(cfg, [str(tmp_path / "model_7.pt")])
    row = registry["ingredients"][0]
    assert row["id"] == "model_7" and row["source"] == "import" and row["val_acc"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    imported, meta = load_classifier(row["checkpoint_uri"])
    assert meta["model_name"] == "ViT-B-32-quickgelu" and meta["class_names"] == ["cat", "dog"]
    for name, value in clip.visual.state_dict().items():
        assert torch.equal(imported.visual.state_dict()[name], value), name
    assert torch.equal(imported.head.weight, state["classification_head.weight"])
    assert torch.equal(imported.head.bias, state["classification_head.bias"])
