"""The published fused/ folder carries a model card: what, how made, results, how to load it,
and the input normalisation the head expects."""
from __future__ import annotations

import json

from conftest import tiny_config

from pipeline import storage
from pipeline.soup import publish
from pipeline.report.results import method_entry

MEAN, STD = [0.5, 0.25, 0.125], [0.3, 0.2, 0.1]


def fake_report(cfg, run_id: str) -> dict:
    ids = ["ft-000", "ft-001", "ft-002"]
    beta = [[0.5, 0.5], [0.0, 0.0], [0.5, 0.5]]
    methods = {name: method_entry(0.9 + i / 100, 0.8, {"noise": 0.5, "blur": 0.6}, ids, beta)
               for i, name in enumerate(["zero_shot", "best_individual", "uniform_soup", "greedy_soup", "mmms"])}
    return {"run_id": run_id, "methods": methods, "components": ["stem", "head"],
            "config": cfg.model_dump(mode="json"), "splits": {"val": "val", "id_test": "id_test", "ood": ["noise", "blur"]},
            "split_sizes": {"val": 100, "id_test": 200, "noise": 200, "blur": 200},
            "evaluations": {"evaluated": 77}, "phase2_decision": "phase 1 kept", "seed": 1}


def fused_dir_files() -> dict[str, bytes]:
    config = {"model_cfg": {"embed_dim": 8}, "preprocess_cfg": {"size": 16, "mean": MEAN, "std": STD,
                                                               "interpolation": "bicubic", "resize_mode": "shortest"}}
    return {"fused/open_clip_config.json": json.dumps(config).encode(),
            "fused/classnames.json": json.dumps(["a", "b", "c"]).encode(),
            "fused/head.safetensors": b"not read by the card"}


def test_published_fused_folder_has_a_model_card(tmp_path):
    cfg = tiny_config(str(tmp_path / "out"))
    dest = publish.publish_run(cfg, "run-1", fused_dir_files(), report=fake_report(cfg, "run-1"))
    card = storage.read_bytes(storage.join(dest, "fused", "README.md")).decode()
    assert f"mean {MEAN} and std {STD}" in card and "L2-normalised" in card
    assert 'create_model_and_transforms("local-dir:' in card and "head.safetensors" in card
    assert "3 finetunes" in card and "mixes 2 of them (ft-000, ft-002)" in card and "stem, head" in card
    assert "| mmms | 94.0" in card and "over 3 classes" in card
    assert "fused/README.md" in storage.read_json(storage.join(dest, "MANIFEST.json"))["files"]
    # without the report (callers not yet passing it) nothing changes
    dest2 = publish.publish_run(cfg, "run-2", fused_dir_files())
    assert not storage.exists(storage.join(dest2, "fused", "README.md"))


def test_card_front_matter_is_hub_metadata(tmp_path):
    """The card opens with the Hub's YAML metadata, parsed by huggingface_hub itself."""
    from huggingface_hub import ModelCard

    cfg = tiny_config(str(tmp_path / "out"), "model.name=ViT-B-32-quickgelu", "model.pretrained=openai",
                      "card.datasets=[ILSVRC/imagenet-1k]", "card.tags=[my-tag]", "card.license=mit")
    dest = publish.publish_run(cfg, "run-1", fused_dir_files(), report=fake_report(cfg, "run-1"))
    path = tmp_path / "README.md"
    path.write_bytes(storage.read_bytes(storage.join(dest, "fused", "README.md")))
    card = ModelCard.load(path)
    data = card.data
    assert data.library_name == "open_clip" and data.pipeline_tag == "image-classification"
    assert data.license == "mit" and data.base_model == "timm/vit_base_patch32_clip_224.openai"
    assert data.datasets == ["ILSVRC/imagenet-1k"] and {"open_clip", "clip", "my-tag"} <= set(data.tags)
    results = {(r.dataset_name, r.dataset_split): r.metric_value for r in data.eval_results}
    # mmms is the 5th row of fake_report: val 0.94, id_test 0.8, noise 0.5, blur 0.6
    assert results == {("val", "val"): 94.0, ("id_test", "id_test"): 80.0, ("noise", "ood"): 50.0,
                       ("blur", "ood"): 60.0}
    assert all(r.task_type == "image-classification" and r.metric_type == "accuracy" for r in data.eval_results)
    assert 'create_model_and_transforms(f"hf-hub:{repo}")' in card.text
    assert 'hf_hub_download(repo, "head.safetensors")' in card.text


def test_demo_card_has_no_base_model_and_the_default_license(tmp_path):
    from huggingface_hub import ModelCard

    cfg = tiny_config(str(tmp_path / "out"))
    dest = publish.publish_run(cfg, "run-1", fused_dir_files(), report=fake_report(cfg, "run-1"))
    card = ModelCard(storage.read_bytes(storage.join(dest, "fused", "README.md")).decode())
    assert card.data.base_model is None and card.data.license == "apache-2.0" and card.data.datasets is None

def test_the_card_describes_the_published_method(tmp_path):
    cfg = tiny_config(str(tmp_path / "out"), "soup.methods.model_stock.enabled=true", "soup.publish=model_stock")
    report = fake_report(cfg, "run-3")
    report["methods"]["model_stock"] = method_entry(0.97, 0.85, {"noise": 0.5, "blur": 0.6}, [], [])
    report["published"] = "model_stock"
    report["model_stock"] = {"members": ["ft-002", "ft-000"], "start": "zero_shot", "t": {"head.weight": 0.5}}
    dest = publish.publish_run(cfg, "run-3", fused_dir_files(), report=report)
    card = storage.read_bytes(storage.join(dest, "fused", "README.md")).decode()
    assert "soup method **model_stock** (Model Stock:" in card and "(`model_stock` is this model)" in card
    assert "model_stock: members ft-002, ft-000; start zero_shot" in card
    assert "mixes" not in card and "optimizer" not in card  # no mixture, no search to describe
