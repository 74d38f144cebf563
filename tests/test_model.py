"""The model library: open_clip factory use, classifier checkpoints, safe loading, components,
demo pretraining. Random-init models only: nothing here downloads."""
from __future__ import annotations

import json
import os
import socket

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pipeline.config import DemoBaseConfig
from pipeline.model import (DEMO_MODEL, TEMPLATES, CheckpointError, Classifier, build_classifier,
                            classifier_from_state, components, create_clip, image_transform,
                            init_classifier, load_classifier, load_clip, read_checkpoint,
                            resolve_templates, save_classifier, save_clip, tokenizer_for)
from pipeline.model.components import LEVEL_NAMES, component_index
from pipeline.model.pretrain import caption_tokens, pretrain_demo_clip, zero_shot_accuracy

torch.set_num_threads(1)
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def demo_clip():
    torch.manual_seed(0)
    return create_clip(DEMO_MODEL)


@pytest.fixture(scope="module")
def demo_classifier(demo_clip):
    model, _ = demo_clip
    return build_classifier(model, tokenizer_for(DEMO_MODEL), DIGITS, "demo")


@pytest.fixture(scope="module")
def digits():
    """sklearn's 8x8 digits upsampled to the demo's 16x16 RGB, normalised."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:300], dtype=torch.float32) / 16.0
    x = F.interpolate(x[:, None], scale_factor=2).repeat(1, 3, 1, 1)
    return (x - 0.5) / 0.5, torch.tensor(d.target[:300])


def images(n=4, seed=0):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# ---- factory ---------------------------------------------------------------------------------

def test_demo_architecture_is_registered_and_tiny(demo_clip):
    model, preprocess = demo_clip
    assert DEMO_MODEL in open_clip.list_models()
    assert not model.training
    assert preprocess["size"] == 16 and len(preprocess["mean"]) == len(preprocess["std"]) == 3
    assert set(preprocess) == {"size", "mean", "std", "interpolation", "resize_mode"}
    assert model.encode_image(images(2)).shape == (2, 64)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000


def test_tokenizer_works_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the tokenizer tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    tokenizer = tokenizer_for(DEMO_MODEL)
    tokens = tokenizer(["a photo of the digit seven.", "the number two."])
    assert isinstance(tokenizer, open_clip.SimpleTokenizer)
    assert tokens.shape == (2, 16) and tokens[0, 0] == tokenizer.sot_token_id


def test_image_transform_makes_model_input(demo_clip):
    _, preprocess = demo_clip
    img = Image.new("RGB", (20, 24), color=(255, 0, 0))
    for train in (False, True):
        assert image_transform(preprocess, train=train)(img).shape == (3, 16, 16)
    with pytest.raises(ValueError, match="size"):
        image_transform({"mean": [0.5] * 3, "std": [0.5] * 3})


def test_saved_clip_loads_with_open_clip_local_dir(demo_clip, tmp_path):
    model, preprocess = demo_clip
    save_clip(str(tmp_path / "base"), model, DEMO_MODEL, preprocess)
    config = json.loads((tmp_path / "base" / "open_clip_config.json").read_text())
    assert config["model_cfg"] == open_clip.get_model_config(DEMO_MODEL)
    assert config["preprocess_cfg"]["size"] == 16

    theirs, _, val_transform = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'base'}")
    ours, ours_pre = load_clip(str(tmp_path / "base"))
    via_name, _ = create_clip(DEMO_MODEL, str(tmp_path / "base"))
    via_file, _ = create_clip(DEMO_MODEL, str(tmp_path / "base" / "open_clip_model.safetensors"))
    text = tokenizer_for(DEMO_MODEL)(["the number four."])
    for other in (theirs.eval(), ours, via_name, via_file):
        assert torch.equal(other.encode_image(images()), model.encode_image(images()))
        assert torch.equal(other.encode_text(text), model.encode_text(text))
    assert ours_pre == preprocess
    assert val_transform(Image.new("RGB", (16, 16))).shape == (3, 16, 16)


def test_saved_clip_round_trips_through_s3(demo_clip, s3_bucket):
    model, preprocess = demo_clip
    uri = f"{s3_bucket}/model-test/base"
    save_clip(uri, model, DEMO_MODEL, preprocess)
    loaded, loaded_pre = create_clip(DEMO_MODEL, uri)
    assert torch.equal(loaded.encode_image(images()), model.encode_image(images()))
    assert loaded_pre == preprocess


def test_create_clip_explains_bad_sources(demo_clip, tmp_path):
    model, preprocess = demo_clip
    with pytest.raises(CheckpointError, match="resolve it"):
        create_clip(DEMO_MODEL, "demo")
    with pytest.raises(CheckpointError, match="unknown model name 'no-such-net'"):
        create_clip("no-such-net")
    with pytest.raises(CheckpointError, match="neither a directory, a weights file nor an open_clip tag"):
        create_clip(DEMO_MODEL, str(tmp_path / "missing.safetensors"))
    save_clip(str(tmp_path / "base"), model, DEMO_MODEL, preprocess)
    with pytest.raises(CheckpointError, match="different architecture"):
        create_clip("ViT-B-32", str(tmp_path / "base"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="open_clip_config.json is missing"):
        load_clip(str(tmp_path / "empty"))


def test_create_clip_refuses_weights_of_another_architecture(tmp_path):
    other = init_classifier(DEMO_MODEL, 3)  # classifier keys, not a CLIP state dict
    torch.save(other.state_dict(), tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match=r"wrong\.pt.*missing"):
        create_clip(DEMO_MODEL, str(tmp_path / "wrong.pt"))


# ---- classifier and checkpoints --------------------------------------------------------------

def test_zero_shot_head_is_scaled_text_embeddings(demo_clip, demo_classifier):
    model, _ = demo_clip
    clf = demo_classifier
    tokenizer = tokenizer_for(DEMO_MODEL)
    texts = tokenizer([t.format("seven") for t in TEMPLATES["demo"]])
    emb = F.normalize(F.normalize(model.encode_text(texts), dim=-1).mean(0), dim=0)
    scale = model.logit_scale.exp()
    assert torch.allclose(clf.head.weight[7], scale * emb, atol=1e-5)
    assert torch.all(clf.head.bias == 0)
    assert isinstance(clf, Classifier) and clf.visual is model.visual
    expected = F.normalize(model.encode_image(images()), dim=-1) @ clf.head.weight.T
    assert torch.allclose(clf(images()), expected, atol=1e-5)


def test_zero_shot_head_in_class_batches_matches_one_batch(demo_clip):
    """Classes go through the text tower a few at a time (ImageNet's 80,000 prompts at once
    would take ~150 GB): the head is the one a single batch gives."""
    from pipeline.model.classifier import classes_per_batch

    model, _ = demo_clip
    names = [f"class {i}" for i in range(7)]
    whole = build_classifier(model, tokenizer_for(DEMO_MODEL), names, "demo", prompts_per_batch=1000)
    batched = build_classifier(model, tokenizer_for(DEMO_MODEL), names, "demo", prompts_per_batch=8)
    assert classes_per_batch(4, 8) == 2 and classes_per_batch(80, 256) == 3 and classes_per_batch(80, 8) == 1
    assert torch.allclose(whole.head.weight, batched.head.weight, atol=1e-5)


def test_head_runs_in_float32_under_autocast_so_near_ties_keep_their_order():
    """Logits 20.02 and 20.05 are one bfloat16 value (steps of 0.125 between 16 and 32): a
    bfloat16 head calls it a tie and picks the lower index. The head runs in float32."""
    head = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[20.02, 0.0], [20.05, 0.0]]))
    clf = Classifier(nn.Identity(), head).eval()
    x = torch.tensor([[1.0, 0.0]])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        low_precision = head(x)  # what the head gave under autocast before
        logits = clf(x)
    assert low_precision.dtype == torch.bfloat16 and low_precision.argmax(1).item() == 0  # the tie
    assert logits.dtype == torch.float32 and logits.argmax(1).item() == 1
    assert torch.allclose(logits, torch.tensor([[20.02, 20.05]]))


def test_templates_resolve_by_name_or_list():
    assert resolve_templates("demo") == TEMPLATES["demo"]
    assert len(resolve_templates("openai_imagenet")) == 80
    assert resolve_templates(["a {}"]) == ["a {}"]
    with pytest.raises(ValueError, match="unknown template set 'imagenet'"):
        resolve_templates("imagenet")
    with pytest.raises(ValueError, match="must contain"):
        resolve_templates(["no placeholder"])


def test_classifier_checkpoint_round_trip_is_bit_exact(demo_classifier, demo_clip, tmp_path):
    _, preprocess = demo_clip
    uri = str(tmp_path / "ingredient.safetensors")
    data = save_classifier(uri, demo_classifier, model_name=DEMO_MODEL, class_names=DIGITS,
                           preprocess=preprocess, extra={"trial": 3, "hparams": {"lr": 1e-3}, "note": "x"})
    assert data == (tmp_path / "ingredient.safetensors").read_bytes()
    tensors, _ = read_checkpoint(uri)
    assert set(tensors) == set(demo_classifier.state_dict())
    assert all(k.startswith(("visual.", "head.")) for k in tensors)

    loaded, meta = load_classifier(uri)
    assert torch.equal(loaded(images()), demo_classifier(images()))
    assert meta["format"] == "frankensoup-classifier-v1" and meta["model_name"] == DEMO_MODEL
    assert meta["class_names"] == DIGITS and meta["preprocess"] == preprocess
    assert meta["trial"] == 3 and meta["hparams"] == {"lr": 1e-3} and meta["note"] == "x"
    with pytest.raises(ValueError, match="reserved"):
        save_classifier(uri, demo_classifier, model_name=DEMO_MODEL, class_names=DIGITS,
                        preprocess=preprocess, extra={"class_names": []})


def test_load_classifier_refuses_foreign_safetensors(tmp_path):
    from pipeline.storage import save_tensors

    save_tensors(str(tmp_path / "plain.safetensors"), {"w": torch.ones(2)})
    with pytest.raises(CheckpointError, match=r"plain\.safetensors.*not a frankensoup-classifier-v1"):
        load_classifier(str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        read_checkpoint(str(tmp_path / "weights.npz"))


class _RunsCode:
    """A pickle payload: unpickling it calls os.mkdir (harmless, but visible)."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path, demo_classifier):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": demo_classifier.state_dict(), "payload": _RunsCode(str(marker))}, path)
    with pytest.raises(CheckpointError, match=r"refused to load .*evil\.pt.*could run code"):
        read_checkpoint(str(path))
    with pytest.raises(CheckpointError, match=r"evil\.pt"):
        create_clip(DEMO_MODEL, str(path))
    assert not marker.exists()


def test_legacy_state_dict_pt_loads(tmp_path, demo_classifier):
    state = demo_classifier.state_dict()
    torch.save(state, tmp_path / "plain.pt")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "nested.pth")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.bin")
    for name in ("plain.pt", "nested.pth", "ddp.bin"):
        tensors, meta = read_checkpoint(str(tmp_path / name))
        assert meta == {}
        clf = classifier_from_state(DEMO_MODEL, tensors, len(DIGITS), source=name)
        assert torch.equal(clf(images()), demo_classifier(images()))


def test_mismatched_architecture_is_refused_clearly(demo_classifier, tmp_path):
    state = demo_classifier.state_dict()
    with pytest.raises(CheckpointError, match=r"'ckpt-a'.*wrong shape.*head\.weight"):
        classifier_from_state(DEMO_MODEL, state, n_classes=5, source="ckpt-a")
    with pytest.raises(CheckpointError, match=r"'ckpt-b'.*missing.*visual\.transformer\.resblocks\.3"):
        classifier_from_state("ViT-S-32", state, n_classes=10, source="ckpt-b")
    incomplete = {k: v for k, v in state.items() if k != "head.bias"}
    with pytest.raises(CheckpointError, match=r"1 missing \(first: head\.bias\)"):
        classifier_from_state(DEMO_MODEL, incomplete, n_classes=10)


# ---- components ------------------------------------------------------------------------------

def check_partition(clf: nn.Module) -> list[int]:
    """Every parameter in exactly one component at every level; returns the counts."""
    names = [n for n, _ in clf.named_parameters()]
    counts = []
    for level in sorted(LEVEL_NAMES):
        comps = components(clf, level)
        flat = [p for c in comps for p in c.params]
        assert sorted(flat) == sorted(names) and len(flat) == len(set(flat))
        assert all(c.params for c in comps)
        assert components(clf, level) == comps  # stable
        counts.append(len(comps))
    assert [c.params[0] for c in components(clf, 3)] == [p for c in components(clf, 2) for p in c.params]
    return counts


def test_components_of_vit_b_32():
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-32")  # random init: no download
    clf = Classifier(clip.visual, nn.Linear(512, 1000))
    n_tensors = len(list(clf.parameters()))
    assert check_partition(clf) == [1, 3, 14, n_tensors]
    level2 = components(clf, 2)
    assert [c.name for c in level2] == ["stem"] + [f"block.{i}" for i in range(12)] + ["head"]
    assert set(level2[0].params) == {"visual.conv1.weight", "visual.class_embedding",
                                     "visual.positional_embedding", "visual.ln_pre.weight",
                                     "visual.ln_pre.bias"}
    assert set(level2[-1].params) == {"visual.ln_post.weight", "visual.ln_post.bias",
                                      "visual.proj", "head.weight", "head.bias"}
    assert [c.name for c in components(clf, 1)] == ["stem", "transformer", "head"]


def test_components_of_demo_classifier(demo_classifier):
    counts = check_partition(demo_classifier)
    assert counts == [1, 3, 5, len(list(demo_classifier.parameters()))]
    assert all(not c.buffers for c in components(demo_classifier, 2))


def test_components_of_resnet_carry_batchnorm_stats():
    torch.manual_seed(0)
    clf = init_classifier("RN50", 10)
    assert check_partition(clf)[:3] == [1, 3, 18]
    level2 = components(clf, 2)
    assert [c.name for c in level2[:4]] == ["stem", "layer1.0", "layer1.1", "layer1.2"]
    assert level2[-2].name == "layer4.2" and level2[-1].name == "head"
    assert "visual.attnpool.c_proj.weight" in level2[-1].params
    float_buffers = {k for k, v in clf.state_dict().items()
                     if torch.is_floating_point(v) and k not in dict(clf.named_parameters())}
    for level in sorted(LEVEL_NAMES):
        index = component_index(components(clf, level))
        assert float_buffers <= set(index)
        assert index["visual.layer1.0.bn1.running_mean"] == index["visual.layer1.0.bn1.weight"]


def test_components_of_a_timm_tower():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    clf = init_classifier("convnext_tiny", 10)
    counts = check_partition(clf)
    assert counts[:2] == [1, 3] and counts[2] == 2 + 18  # stem, 3+3+9+3 blocks, head
    assert components(clf, 2)[-1].params[-3:] == ("visual.head.proj.weight", "head.weight", "head.bias")


def test_components_reject_unknown_levels(demo_classifier):
    with pytest.raises(ValueError, match="level"):
        components(demo_classifier, 4)


# ---- demo pretraining ------------------------------------------------------------------------

def fixed_batch_loss(model, x, y, tokens) -> float:
    idx = torch.stack([torch.nonzero(y == c)[0, 0] for c in range(len(DIGITS))])
    with torch.no_grad():
        return open_clip.ClipLoss()(*model(x[idx], tokens[:, 0])).item()


def test_pretraining_lowers_the_contrastive_loss(digits):
    x, y = digits
    logs = []
    cfg = DemoBaseConfig(steps=60, lr=2e-3, seed=0)
    model = pretrain_demo_clip(x, y, DIGITS, cfg, log=logs.append)
    tokens = caption_tokens(tokenizer_for(DEMO_MODEL), DIGITS, TEMPLATES["demo"])
    random_losses = []
    for seed in range(2):
        torch.manual_seed(seed)
        random_losses.append(fixed_batch_loss(create_clip(DEMO_MODEL)[0], x, y, tokens))
    assert fixed_batch_loss(model, x, y, tokens) < min(random_losses) - 0.1
    assert not model.training and logs and "60/60" in logs[-1]
    clf = build_classifier(model, tokenizer_for(DEMO_MODEL), DIGITS, "demo")
    acc = zero_shot_accuracy(clf, x, y)
    assert 0.0 <= acc <= 1.0 and clf(x[:3]).shape == (3, 10)


def test_pretraining_is_reproducible_and_checks_batch_size(digits):
    x, y = digits
    cfg = DemoBaseConfig(steps=3, seed=5)
    a = pretrain_demo_clip(x, y, DIGITS, cfg, log=lambda _: None)
    b = pretrain_demo_clip(x, y, DIGITS, cfg, log=lambda _: None)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="batch_size=11 exceeds the 10 classes"):
        pretrain_demo_clip(x, y, DIGITS, DemoBaseConfig(steps=3, batch_size=11), log=lambda _: None)
