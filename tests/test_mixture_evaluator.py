"""The fast mixture evaluator against plain fusion (pipeline.soup.mixing.fuse, then
load_state_dict into a fresh model and run it).

Tiny open_clip classifiers (random init, no download): a ViT, and a ModifiedResNet whose
BatchNorm statistics are mixed too. Ingredients are random perturbations of the model; labels
are partly one ingredient's own predictions, so ingredients and mixtures score differently."""
from __future__ import annotations

import copy
from typing import NamedTuple

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from conftest import perturbed  # noqa: E402
from pipeline.evaluate.evaluator import (  # noqa: E402
    EvaluatorMemoryError,
    MixtureEvaluator,
    check_fits,
    required_bytes,
)
from pipeline.mixture import COLUMN_SUM_TOLERANCE, EvaluatorInputError, MixtureError, validate  # noqa: E402
from pipeline.model.classifier import Classifier  # noqa: E402
from pipeline.model.components import Component, components  # noqa: E402
from pipeline.soup.mixing import fuse, one_hot, uniform  # noqa: E402

torch.set_num_threads(1)
N_CLASSES = 10
N_IMAGES = 100
BATCH = 32  # 100 images: three full batches and a remainder
TEXT_CFG = dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1)
VISION_CFGS = {
    "vit": dict(image_size=16, patch_size=8, width=32, layers=2, head_width=16, mlp_ratio=2.0),
    "resnet": dict(image_size=32, layers=(1, 1, 1, 1), width=8, head_width=8),
}


class World(NamedTuple):
    base: Classifier
    ingredients: list[dict]
    components: list[Component]
    images: torch.Tensor
    labels: torch.Tensor


def tiny_classifier(arch: str) -> Classifier:
    torch.manual_seed(0)
    clip = open_clip.model.CLIP(embed_dim=16, vision_cfg=VISION_CFGS[arch], text_cfg=TEXT_CFG)
    return Classifier(clip.visual, torch.nn.Linear(16, N_CLASSES)).eval()


def make_world(arch: str, level: int) -> World:
    base = tiny_classifier(arch)
    ingredients = [perturbed(base.state_dict(), seed, 0.3) for seed in range(1, 5)]
    size = VISION_CFGS[arch]["image_size"]
    gen = torch.Generator().manual_seed(7)
    images = torch.randn(N_IMAGES, 3, size, size, generator=gen)
    # two thirds agree with ingredient 0, the rest are random: ingredients score differently
    teacher = copy.deepcopy(base)
    teacher.load_state_dict(ingredients[0])
    with torch.no_grad():
        labels = teacher(images).argmax(1)
    n_random = N_IMAGES - N_IMAGES * 2 // 3
    labels[-n_random:] = torch.randint(0, N_CLASSES, (n_random,), generator=gen)
    return World(base, ingredients, components(base, level), images, labels)


def plain_accuracy(base: torch.nn.Module, state: dict, images, labels, class_mask=None) -> float:
    """The slow way: a fresh copy of the model, load_state_dict, forward in the same batches."""
    model = copy.deepcopy(base)
    model.load_state_dict(state)
    model.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(images), BATCH):
            logits = model(images[s:s + BATCH])
            if class_mask is not None:
                logits[:, ~class_mask] = float("-inf")
            correct += (logits.argmax(1) == labels[s:s + BATCH]).sum().item()
    return correct / len(images)


def random_mixture(k: int, c: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(k), size=c).T


@pytest.fixture(scope="module")
def world() -> World:
    return make_world("vit", level=1)  # stem / transformer / head


@pytest.fixture(scope="module", params=["vit", "resnet"])
def any_world(request) -> World:
    return make_world(request.param, level=2)  # stem / one per block / head


def make_evaluator(world: World, **kw) -> MixtureEvaluator:
    kw.setdefault("batch_size", BATCH)
    return MixtureEvaluator(copy.deepcopy(world.base), world.ingredients, world.components,
                            world.images, world.labels, device="cpu", threads=1, **kw)


def test_one_hot_is_bit_exact_and_scores_like_a_plain_load(any_world):
    w = any_world
    ev = make_evaluator(w)
    k, c = ev.beta_shape
    assert (k, c) == (4, len(w.components))
    accuracies = ev.evaluate([one_hot(k, c, j) for j in range(k)])
    for j, ingredient in enumerate(w.ingredients):
        fused = ev.fused_state_dict(one_hot(k, c, j))
        assert fused.keys() == ingredient.keys()
        for key in ingredient:
            assert torch.equal(fused[key], ingredient[key]), (j, key)
        assert accuracies[j] == plain_accuracy(w.base, ingredient, w.images, w.labels)
    assert len(set(accuracies)) > 1, "ingredients must score differently for this test to mean anything"


def test_uniform_mixture_is_the_average_state_dict(any_world):
    w = any_world
    ev = make_evaluator(w)
    fused = ev.fused_state_dict(uniform(*ev.beta_shape))
    for key, ref in w.ingredients[0].items():
        if ref.is_floating_point():
            average = torch.stack([ing[key] for ing in w.ingredients]).mean(0)
            torch.testing.assert_close(fused[key], average, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(fused[key], w.base.state_dict()[key])


def test_per_component_mixture_scores_like_plain_fusion(any_world):
    w = any_world
    ev = make_evaluator(w)
    betas = [random_mixture(*ev.beta_shape, seed) for seed in range(3)]
    accuracies = ev.evaluate(betas)
    for beta, accuracy in zip(betas, accuracies):
        plain = fuse(w.ingredients, beta, w.components)
        fused = ev.fused_state_dict(beta)
        for key in plain:
            torch.testing.assert_close(fused[key], plain[key], rtol=1e-6, atol=1e-6)
        assert accuracy == plain_accuracy(w.base, plain, w.images, w.labels)


def test_components_mix_independently(world):
    ev = make_evaluator(world)
    k, c = ev.beta_shape
    beta = one_hot(k, c, 1)
    beta[:, 1] = [0.0, 0.0, 0.0, 1.0]  # the transformer comes from ingredient 3, the rest from 1
    fused = ev.fused_state_dict(beta)
    assert world.components[1].name == "transformer"
    for key in world.ingredients[0]:
        source = 3 if key in world.components[1].params else 1
        assert torch.equal(fused[key], world.ingredients[source][key]), key


def test_bfloat16_ingredients(any_world):
    w = any_world
    ev = make_evaluator(w, dtype="bfloat16")
    k, c = ev.beta_shape
    for j in (0, 2):
        fused = ev.fused_state_dict(one_hot(k, c, j))
        rounded = {key: v.to(torch.bfloat16).float() if v.is_floating_point() else v
                   for key, v in w.ingredients[j].items()}
        for key in rounded:
            assert torch.equal(fused[key], rounded[key]), (j, key)
        assert ev.evaluate([one_hot(k, c, j)]) == [plain_accuracy(w.base, rounded, w.images, w.labels)]
    beta = random_mixture(k, c, 11)
    fused = ev.fused_state_dict(beta)
    # the weights are rounded to bfloat16, the mixture itself is summed in float32
    rounded = [{key: v.to(torch.bfloat16).to(v.dtype) for key, v in ing.items()} for ing in w.ingredients]
    of_rounded = fuse(rounded, beta, w.components)
    of_float32 = fuse(w.ingredients, beta, w.components)
    for key in of_rounded:
        torch.testing.assert_close(fused[key], of_rounded[key], rtol=1e-6, atol=1e-6)
        scale = max(ing[key].abs().max().item() for ing in w.ingredients) if of_float32[key].numel() else 0.0
        assert (fused[key].double() - of_float32[key].double()).abs().max() <= 2 ** -8 * scale, key
    assert ev.evaluate([beta]) == [plain_accuracy(w.base, fused, w.images, w.labels)]


def test_memory_check_numbers():
    # 72 ViT-B/32 ingredients (~88M params) in float32: ~25 GB, as the brief says
    fp32 = required_bytes(72, 88_000_000, "float32", None)
    assert 25.3e9 < fp32 < 25.8e9
    bf16 = required_bytes(72, 88_000_000, "bfloat16", None)
    assert bf16 < 0.55 * fp32
    images = torch.empty(26_000, 3, 224, 224, device="meta")  # sized, never allocated
    assert required_bytes(72, 88_000_000, "float32", images) == fp32 + images.numel() * 4
    with pytest.raises(EvaluatorMemoryError, match=r"needs 23\.9 GiB, over the limit of 8 GiB"):
        check_fits(fp32, "cpu", limit_gb=8)
    with pytest.raises(EvaluatorMemoryError, match="available"):
        check_fits(1 << 62, "cpu")
    check_fits(1 << 20, "cpu")  # a megabyte fits anywhere
    with pytest.raises(EvaluatorInputError, match="float16"):
        required_bytes(1, 1, "float16", None)


def test_evaluator_refuses_an_oversize_request_before_touching_the_model(world):
    base, ingredients, components, images, labels = world
    model = copy.deepcopy(base)
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    n_params = sum(p.numel() for p in model.parameters())
    with pytest.raises(EvaluatorMemoryError) as err:
        MixtureEvaluator(model, ingredients, components, images, labels, device="cpu", memory_limit_gb=1e-4)
    message = str(err.value)
    assert f"4 ingredients x {n_params:,} params in float32" in message
    assert "GiB" in message and "limit" in message
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == before
    assert isinstance(err.value, MemoryError)


@pytest.mark.parametrize("break_it, words", [
    (lambda sd: sd.pop("head.bias"), ["ingredient 2", "missing", "'head.bias'"]),
    (lambda sd: sd.__setitem__("head.weight", torch.zeros(3, 16)), ["ingredient 2", "'head.weight'", "(3, 16)"]),
    (lambda sd: sd.__setitem__("head.extra", torch.zeros(1)), ["ingredient 2", "'head.extra'"]),
    (lambda sd: sd["visual.ln_post.bias"].__setitem__(0, float("nan")),
     ["ingredient 2", "'visual.ln_post.bias'", "NaN"]),
])
def test_mismatched_ingredient_is_refused(world, break_it, words):
    base, ingredients, components, images, labels = world
    bad = [dict(sd) for sd in ingredients]
    bad[2] = {k: v.clone() for k, v in bad[2].items()}
    break_it(bad[2])
    with pytest.raises(ValueError) as err:
        MixtureEvaluator(copy.deepcopy(base), bad, components, images, labels, device="cpu")
    for word in words:
        assert word in str(err.value)


def test_components_must_cover_every_parameter_once(world):
    base, ingredients, components, images, labels = world

    def build(comps):
        return MixtureEvaluator(copy.deepcopy(base), ingredients, comps, images, labels, device="cpu")

    with pytest.raises(EvaluatorInputError, match="no component"):
        build(components[:2])
    with pytest.raises(EvaluatorInputError, match="'head.bias' is in components 'head' and 'again'"):
        build(components + [Component("again", ("head.bias",))])
    with pytest.raises(EvaluatorInputError, match="'nope'"):
        build(components + [Component("typo", ("nope",))])


def test_bad_mixtures_are_refused_before_any_is_run(world):
    ev = make_evaluator(world)
    k, c = ev.beta_shape
    good = np.full((k, c), 1.0 / k)
    not_summing = good.copy()
    not_summing[0, 2] += 0.1
    negative = good.copy()
    negative[0, 0], negative[1, 0] = -0.25, good[1, 0] + 0.5
    with pytest.raises(EvaluatorInputError, match=r"mixture 1: shape \(3, 3\)"):
        ev.evaluate([good, np.full((3, c), 1 / 3)])
    with pytest.raises(EvaluatorInputError, match="mixture 1: column 2 \\('head'\\) sums to 1.1"):
        ev.evaluate([good, not_summing])
    with pytest.raises(EvaluatorInputError, match=">= 0"):
        ev.evaluate([negative])


def test_the_evaluator_scores_exactly_what_the_soup_accepts(world):
    ev = make_evaluator(world)
    k, c = ev.beta_shape
    near, off = one_hot(k, c, 0), one_hot(k, c, 0)
    near[1, 0], off[1, 0] = 0.5 * COLUMN_SUM_TOLERANCE, 2 * COLUMN_SUM_TOLERANCE
    assert validate(near) is not None and len(ev.evaluate([near])) == 1
    with pytest.raises(MixtureError, match="column 0 sums"):
        validate(off)
    with pytest.raises(EvaluatorInputError, match="mixture 0: column 0 .* sums"):
        ev.evaluate([off])


def test_repeated_evaluation_is_deterministic(world):
    ev = make_evaluator(world)
    a, b = random_mixture(*ev.beta_shape, 1), random_mixture(*ev.beta_shape, 2)
    first = ev.fused_state_dict(a)
    results = ev([a, b, a])
    assert results[0] == results[2]
    assert ev.evaluate([b]) == [results[1]]
    again = ev.fused_state_dict(a)
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_forward_accuracy_scores_the_resident_weights(world):
    base, ingredients, _, images, labels = world
    ev = make_evaluator(world)
    assert ev.forward_accuracy() == plain_accuracy(base, base.state_dict(), images, labels)
    k, c = ev.beta_shape
    [acc] = ev.evaluate([one_hot(k, c, 3)])
    assert ev.forward_accuracy() == acc == plain_accuracy(base, ingredients[3], images, labels)


def test_class_mask_scores_only_the_subset(world):
    base, ingredients, _, images, labels = world
    mask = torch.zeros(N_CLASSES, dtype=torch.bool)
    mask[[0, 2, 3, 5, 7, 8]] = True
    ev = make_evaluator(world, class_mask=mask)
    k, c = ev.beta_shape
    masked = ev.evaluate([one_hot(k, c, j) for j in range(k)])
    unmasked = make_evaluator(world).evaluate([one_hot(k, c, j) for j in range(k)])
    assert masked == [plain_accuracy(base, ing, images, labels, class_mask=mask) for ing in ingredients]
    assert masked != unmasked


def test_class_map_scores_like_a_projection_of_logits(world):
    """ObjectNet style: 4 dataset classes, each the union of some model classes; model classes
    4 and 9 are not in the dataset. Reference: model soups' projection (max logit per dataset
    class, then argmax over dataset classes)."""
    base, ingredients, _, images, labels = world
    class_map = torch.tensor([0, 0, 1, 2, -1, 1, 3, 3, 2, -1])
    dataset_labels = class_map[labels].clamp(min=0)  # images of unmapped classes get label 0
    world_mapped = world._replace(labels=dataset_labels)
    ev = make_evaluator(world_mapped, class_map=class_map)
    k, c = ev.beta_shape
    got = ev.evaluate([one_hot(k, c, j) for j in range(k)])
    for j, ingredient in enumerate(ingredients):
        model = copy.deepcopy(base)
        model.load_state_dict(ingredient)
        with torch.no_grad():
            logits = model(images)
        projected = torch.stack([logits[:, class_map == d].max(1).values for d in range(4)], dim=1)
        expected = (projected.argmax(1) == dataset_labels).sum().item() / N_IMAGES
        assert got[j] == expected


def test_scoring_options_are_checked(world):
    with pytest.raises(EvaluatorInputError, match="bool"):
        make_evaluator(world, class_mask=torch.ones(N_CLASSES))
    with pytest.raises(EvaluatorInputError, match="3 classes"):
        make_evaluator(world, class_mask=torch.ones(3, dtype=torch.bool)).forward_accuracy()
    with pytest.raises(EvaluatorInputError, match="labels"):
        base, ingredients, components, images, labels = world
        MixtureEvaluator(copy.deepcopy(base), ingredients, components, images, labels[:5], device="cpu")


@pytest.mark.parametrize("mix_statistics", [False, True])
def test_any_module_and_its_buffers(mix_statistics):
    """A plain Sequential with BatchNorm. Running statistics a component lists are mixed like
    parameters; those no component lists stay the resident model's, whatever the ingredients
    carry."""
    torch.manual_seed(3)
    base = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.BatchNorm1d(8),
                               torch.nn.ReLU(), torch.nn.Linear(8, 5))
    with torch.no_grad():
        base[2].running_mean.uniform_(-1, 1)
        base[2].running_var.uniform_(0.5, 2)
    base.eval()
    statistics = ("2.running_mean", "2.running_var") if mix_statistics else ()
    comps = [Component("first", ("1.weight", "1.bias", "2.weight", "2.bias"), statistics),
             Component("last", ("4.weight", "4.bias"))]
    ingredients = [perturbed(base.state_dict(), s, 0.5) for s in range(3)]
    images = torch.randn(40, 3, 4)
    labels = torch.randint(0, 5, (40,), generator=torch.Generator().manual_seed(0))
    ev = MixtureEvaluator(copy.deepcopy(base), ingredients, comps, images, labels,
                          device="cpu", batch_size=16, threads=1)
    mixed = {n for c in comps for n in c.params + c.buffers}
    for j, ingredient in enumerate(ingredients):
        fused = ev.fused_state_dict(one_hot(3, 2, j))
        expected_state = {k: ingredient[k] if k in mixed else v for k, v in base.state_dict().items()}
        assert fused.keys() == expected_state.keys()
        assert all(torch.equal(fused[k], expected_state[k]) for k in expected_state)
        assert not torch.equal(ingredient["2.running_mean"], base[2].running_mean)
        model = copy.deepcopy(base)
        model.load_state_dict(expected_state)
        with torch.no_grad():
            expected = sum((model(images[s:s + 16]).argmax(1) == labels[s:s + 16]).sum().item()
                           for s in range(0, 40, 16)) / 40
        assert ev.evaluate([one_hot(3, 2, j)]) == [expected]


# ---- shards and the working set -------------------------------------------------------------

def test_shards_are_whole_batches_and_predictions_do_not_depend_on_them(world):
    """Per-image outcomes on a real evaluator are the same for S = 1, 2, 3 (uneven) shards, the
    shards' integer counts sum to the unsharded count, and a threshold's per-shard early stop
    decides exactly as the unsharded test does."""
    from pipeline.mixture import Threshold, combine, misses_allowed, shard_bounds

    assert shard_bounds(100, 32, 3) == [(0, 32), (32, 64), (64, 100)]  # 4 batches: 1, 1, 2
    assert shard_bounds(100, 32, 9) == [(0, 32), (32, 64), (64, 96), (96, 100)]  # at most one per batch
    ev = make_evaluator(world)
    k, c = ev.beta_shape
    betas = [random_mixture(k, c, 5), one_hot(k, c, 2)]
    for beta in betas:
        whole = ev.predictions(beta)
        [full] = ev.score([beta])
        for s in (1, 2, 3):
            bounds = ev.shards(s)
            assert torch.equal(torch.cat([ev.predictions(beta, a, b) for a, b in bounds]), whole)
            counts = [ev.score_shard(beta, a, b) for a, b in bounds]
            assert sum(x.correct for x in counts) / N_IMAGES == full.accuracy
            for value in (full.accuracy - 0.05, full.accuracy, full.accuracy + 0.01, 0.99):
                t = Threshold(value)
                [unsharded] = ev.score([beta], [t])
                allowed = misses_allowed(t, N_IMAGES)
                shard_counts = [ev.score_shard(beta, a, b, allowed) for a, b in bounds]
                assert combine(shard_counts, N_IMAGES, t).accuracy == unsharded.accuracy, (s, value)
                assert any(x.stopped for x in shard_counts) <= unsharded.below  # a stop is always right
    with pytest.raises(EvaluatorInputError, match="whole batches"):
        ev.score_shard(betas[0], 0, 40)


def test_a_shard_task_takes_the_mixture_as_the_pool_ships_it(world):
    """The pool serialises a mixture once, as float64 bytes, for all its shard tasks: the same
    count as the array; bytes of another shape are refused naming the expected one."""
    from pipeline.mixture import as_bytes

    ev = make_evaluator(world)
    k, c = ev.beta_shape
    beta = random_mixture(k, c, 9)
    for a, b in ev.shards(2):
        got, expected = ev.score_shard(as_bytes(beta), a, b), ev.score_shard(beta, a, b)
        assert (got.correct, got.images, got.stopped) == (expected.correct, expected.images, expected.stopped)
    with pytest.raises(EvaluatorInputError, match=f"expected {k} x {c} float64"):
        ev.score_shard(as_bytes(beta[:, :-1]), 0, BATCH)


def test_the_probe_reads_the_shards_held_and_keeps_no_copy_of_its_own(world):
    """The probe (pipeline/soup/probe.py) predicts like an evaluator holding all of val, whether
    its images come from the shards served (here across two of them) or are read for it alone;
    it keeps nothing beside the shards, and reads its images once for all its mixtures."""
    from pipeline.evaluate.evaluator import ValImages
    from pipeline.evaluate.actor import probe_predictions
    from pipeline.soup.probe import probe_mixtures

    class Decoded(ValImages):  # decoded when a range is asked for, as SplitImages is
        def __init__(self, images):
            super().__init__(images)
            self.read: list = []

        def rows(self, start, stop):
            self.read.append((start, stop))
            return super().rows(start, stop).clone()

    val = Decoded(world.images)
    ev = MixtureEvaluator(copy.deepcopy(world.base), world.ingredients, world.components, val, world.labels,
                          device="cpu", threads=1, batch_size=BATCH)
    k, c = ev.beta_shape
    probe = probe_mixtures(k, c)
    expected = probe_predictions(make_evaluator(world), probe, 50)
    assert probe_predictions(ev, probe, 50) == expected
    assert val.read == [(0, 50)] and ev.held_ranges == []  # read once, kept by nobody
    bounds = ev.shards(3)
    for a, b in bounds:
        ev.score_shard(probe[1], a, b)
    assert ev.held_ranges == bounds and val.read[1:] == bounds
    assert probe_predictions(ev, probe, 50) == expected  # from shards 0 and 1, read again by nobody
    assert len(val.read) == 4 and ev.held_ranges == bounds


def test_eviction_and_reload_give_identical_results(world):
    """A working set of one row (every mixture of two rows evicts): the same fused weights and
    accuracies as all rows resident; a one-hot row is bit-equal after eviction and reload."""
    base, ingredients, components, images, labels = world
    n_params = sum(p.numel() for p in base.parameters())
    one_row_gb = n_params * 4 / (1 << 30)
    small = make_evaluator(world, working_set_gb=one_row_gb * 1.5)
    full = make_evaluator(world)
    assert small.working_set.capacity == 1 and full.working_set.capacity == 4
    k, c = small.beta_shape
    betas = [random_mixture(k, c, s) for s in range(3)] + [one_hot(k, c, j) for j in (0, 3, 0)]
    assert small.evaluate(betas) == full.evaluate(betas)
    for beta in betas:
        a, b = small.fused_state_dict(beta), full.fused_state_dict(beta)
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert all(torch.equal(small.fused_state_dict(one_hot(k, c, 0))[key], ingredients[0][key]) for key in ingredients[0])
    assert small.working_set.peak_rows == 1 and small.working_set.loads > k  # rows were evicted and reloaded


def test_a_working_set_smaller_than_one_row_is_refused(world):
    with pytest.raises(EvaluatorMemoryError) as err:
        make_evaluator(world, working_set_gb=1e-9)
    message = str(err.value)
    assert "\n" not in message and "evaluate.working_set_gb=1e-09 is smaller than one ingredient row" in message


def test_uint8_val_gives_bit_equal_input_tensors():
    """Val kept as uint8 after resize and crop, normalised per batch: the very tensors the eval
    transform (ToTensor, Normalize) makes, bit for bit, and the evaluator scores them alike."""
    import io

    from PIL import Image

    from pipeline.data.shards import decode_image
    from pipeline.evaluate.actor import SplitImages
    from pipeline.model import image_transform

    rng = np.random.default_rng(0)
    encoded = []
    for i in range(12):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    preprocess = {"size": 16, "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
    transform = image_transform(preprocess, train=False)
    expected = torch.stack([transform(decode_image(b)) for b in encoded])
    val = SplitImages(encoded, preprocess)
    stored = val.rows(0, 12)
    assert stored.dtype == torch.uint8 and val.nbytes == stored.numel() == expected.numel()
    assert torch.equal(val.prepare(stored), expected)
    assert torch.equal(val.prepare(val.rows(4, 9)), expected[4:9])

    w = make_world("vit", level=1)
    labels = torch.arange(12) % N_CLASSES
    a = MixtureEvaluator(copy.deepcopy(w.base), w.ingredients, w.components, expected, labels, device="cpu", batch_size=5)
    b = MixtureEvaluator(copy.deepcopy(w.base), w.ingredients, w.components, val, labels, device="cpu", batch_size=5)
    beta = random_mixture(4, 3, 0)
    assert torch.equal(a.predictions(beta), b.predictions(beta))
    assert torch.equal(b.predictions(beta, 5, 12), a.predictions(beta)[5:])


def test_evaluators_on_a_node_read_each_checkpoint_once(tmp_path, monkeypatch):
    from pipeline import storage
    from pipeline.evaluate import actor

    src = tmp_path / "ingredient.safetensors"
    src.write_bytes(b"checkpoint bytes")
    sha = storage.sha256(b"checkpoint bytes")
    reads = []
    real = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda uri: reads.append(uri) or real(uri))
    cache = str(tmp_path / "node")
    assert actor.node_cached_bytes(str(src), sha, cache) == b"checkpoint bytes"
    assert actor.node_cached_bytes(str(src), sha, cache) == b"checkpoint bytes"
    assert reads == [str(src)]  # the second evaluator read the node's copy
    (tmp_path / "node" / f"{sha}.safetensors").write_bytes(b"corrupted")
    assert actor.node_cached_bytes(str(src), sha, cache) == b"checkpoint bytes"  # a bad copy is replaced
    assert len(reads) == 2


def test_the_gpu_bench_runs_in_its_tiny_cpu_mode(capsys):
    """bench/gpu_evaluator.py, kept working for the first GPU machine: two CPU evaluators, sharded
    and unsharded accuracies equal."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "gpu_evaluator.py")
    spec = importlib.util.spec_from_file_location("gpu_evaluator", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--tiny", "--images", "40", "--evaluations", "1", "--k", "2"])
    assert result["identical"] and result["gpus"] == 2
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("evals_per_s_S1=") and last.endswith("gpus=2 identical=True")
