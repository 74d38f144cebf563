"""The soup stage on Ray: the result does not depend on the number of evaluators or the order
they finish in; a crashed search resumes from its memo; the published model (loaded with
open_clip) and every baseline rebuilt from its beta reproduce the report's numbers; publishing
is atomic; s3:// works end to end; unusable ingredients are refused by name."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch

from conftest import EVALUATED_OVERRIDES, clone_output, tiny_config, upload
from pipeline import layout, storage
from pipeline.evaluate.actor import EvaluatorHost
from pipeline.soup import pool as pool_lib, publish, stage
from pipeline.soup.inputs import SoupInputError, load_inputs, memo_context, split_names
from pipeline.soup.methods import run_methods
from pipeline.soup.memo import Memo, MemoEvaluator
from pipeline.mixture import mixture_key
from pipeline.soup.mixing import fuse

QUIET = {"log": lambda *_: None}
# 4 candidates per batch, so up to 4 evaluators share each batch
SOUP = (*EVALUATED_OVERRIDES, "soup.num_workers=4")
# half a CPU each, so 4 evaluators fit the 2-CPU test cluster together
SHARED_CPUS = "soup.evaluator_resources.cpu=0.5"
METHODS = ["zero_shot", "best_individual", "uniform_soup", "greedy_soup", "wise_ft", "output_ensemble",
           "mmms_phase1", "mmms"]
NOT_MIXTURES = ("zero_shot", "wise_ft", "output_ensemble")
REFERENCE_ROWS = ("soup.wise_ft.enabled=true", "soup.output_ensemble.enabled=true")


def soup_clone(evaluated_demo, dst, *extra):
    return clone_output(evaluated_demo, dst, *SOUP, *extra)


def search_inputs(cfg):
    inputs = load_inputs(cfg)
    val, _, _ = split_names(cfg)
    val_accs = [inputs.evaluations[i][val]["accuracy"] for i in inputs.ids]
    return inputs, val, val_accs


def search_with(cfg, num_evaluators, actor_class=None, **actor_kwargs):
    inputs, val, val_accs = search_inputs(cfg)
    with pool_lib.evaluator_pool(cfg, val, inputs.ids, num_evaluators=num_evaluators, actor_class=actor_class,
                               **actor_kwargs) as pool:
        pool.wait_ready(num_evaluators)  # every actor takes part from the first batch
        result = run_methods(cfg, pool, val_accs, len(inputs.components), None, QUIET["log"])
    return result, pool


class FinishOrder:
    """Decides when each evaluator may answer: the first mixture of a batch only after the
    second, so every batch of two or more comes back out of order, by rule rather than by
    chance. Records the order the answers were given in."""

    def __init__(self):
        self.batch: list[str] = []
        self.second_answered = asyncio.Event()
        self.order: list[str] = []

    async def start_batch(self, keys: list[str]) -> None:
        self.batch = list(keys)
        self.second_answered = asyncio.Event()

    async def answer(self, key: str) -> None:
        """Returns when the evaluator holding mixture ``key`` may answer."""
        if len(self.batch) > 1 and key == self.batch[0]:
            await self.second_answered.wait()
        self.order.append(key)
        if len(self.batch) > 1 and key == self.batch[1]:
            self.second_answered.set()

    async def answered(self) -> list[str]:
        return self.order


class ReorderedHost(EvaluatorHost):
    """The real evaluator, answering when ``FinishOrder`` lets it."""

    def __init__(self, cfg, split_name, ingredient_ids, finish_order):
        super().__init__(cfg, split_name, ingredient_ids)
        self.finish_order = finish_order

    def evaluate(self, betas):
        import ray

        accs = super().evaluate(betas)
        ray.get([self.finish_order.answer.remote(mixture_key(b)) for b in betas])
        return accs


@pytest.fixture(scope="module")
def reference_search(evaluated_demo):
    """The search with one evaluator: what every other way of running it must reproduce."""
    cfg = tiny_config(evaluated_demo.output_uri, *SOUP)
    return search_with(cfg, 1)[0]


def assert_same_search(a, b):
    assert a.betas.keys() == b.betas.keys()
    for name in a.betas:
        np.testing.assert_array_equal(a.betas[name], b.betas[name], err_msg=name)
    assert a.search_val == b.search_val
    assert a["mmms_phase1"].details.chosen == b["mmms_phase1"].details.chosen
    assert a.report_fields()["phase2_kept"] == b.report_fields()["phase2_kept"]


@pytest.mark.parametrize("num_evaluators, shards", [(2, 1), (4, 3)])
def test_the_number_of_evaluators_never_changes_the_result(evaluated_demo, reference_search, num_evaluators, shards):
    """Nor the number of val shards each evaluation is cut into (real evaluator actors)."""
    cfg = tiny_config(evaluated_demo.output_uri, *SOUP, SHARED_CPUS, f"soup.val_shards={shards}")
    result, pool = search_with(cfg, num_evaluators)
    assert len(pool.infos) == num_evaluators
    assert_same_search(result, reference_search)


def test_the_order_evaluators_finish_in_never_changes_the_result(evaluated_demo, reference_search):
    import ray

    cfg = tiny_config(evaluated_demo.output_uri, *SOUP, SHARED_CPUS)
    requested: list[str] = []
    inputs, val, val_accs = search_inputs(cfg)
    finish_order = shipped(FinishOrder).options(num_cpus=0).remote()
    actors = pool_lib.start_evaluators(cfg, val, inputs.ids, num_evaluators=3, actor_class=shipped(ReorderedHost),
                                       finish_order=finish_order)
    with pool_lib.EvaluatorPool(actors) as pool:
        pool.wait_ready(len(actors))

        def evaluate(betas):
            keys = [mixture_key(b) for b in betas]
            ray.get(finish_order.start_batch.remote(keys))
            requested.extend(keys)
            return pool(betas)

        result = run_methods(cfg, evaluate, val_accs, len(inputs.components), None, QUIET["log"])
    assert_same_search(result, reference_search)
    answered = ray.get(finish_order.answered.remote())
    ray.kill(finish_order)
    assert sorted(answered) == sorted(requested)
    assert answered != requested  # the answers really did come back out of order


def test_a_lost_evaluator_hands_its_work_to_the_others(evaluated_demo, reference_search):
    import ray

    cfg = tiny_config(evaluated_demo.output_uri, *SOUP, SHARED_CPUS)
    inputs, val, val_accs = search_inputs(cfg)
    actors = pool_lib.start_evaluators(cfg, val, inputs.ids, num_evaluators=2)
    calls = 0
    with pool_lib.EvaluatorPool(actors) as pool:
        pool.wait_ready(2)

        def evaluate(betas):
            nonlocal calls
            calls += 1
            if calls == 4:
                ray.kill(actors[0])  # its node is lost mid-search
            return pool(betas)

        result = run_methods(cfg, evaluate, val_accs, len(inputs.components), None, QUIET["log"])
        assert pool.in_service == 1
    assert_same_search(result, reference_search)


def shipped(cls):
    """``cls`` as a Ray actor class; the workers cannot import this test module, so its code
    travels with it."""
    import sys

    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return ray.remote(cls)


# ---- one run, crashed and resumed, then published -------------------------------------------

class CrashAfter(pool_lib.EvaluatorPool):
    """The real pool, crashing once it has evaluated ``limit`` mixtures; records every mixture
    it was asked to evaluate."""

    def __init__(self, actors, limit: int | None, seen: list):
        super().__init__(actors)
        self.limit, self.seen = limit, seen

    def __call__(self, betas):
        self.seen.extend(np.array(b) for b in betas)
        if self.limit is not None and self.evaluations + len(betas) > self.limit:
            raise RuntimeError("injected crash")
        return super().__call__(betas)

    def submit(self, beta, threshold=None, priority=0):  # the speculative phase 1's way in
        self.seen.append(np.array(beta))
        if self.limit is not None and self.evaluations + len(self._running) + len(self._queue) + 1 > self.limit:
            raise RuntimeError("injected crash")
        return super().submit(beta, threshold, priority)


def patched_pool(monkeypatch, limit, seen):
    monkeypatch.setattr(pool_lib, "evaluator_pool",
                        lambda cfg, split, ids, **kw: CrashAfter(pool_lib.start_evaluators(cfg, split, ids), limit, seen))


@pytest.fixture(scope="module")
def souped(evaluated_demo, tmp_path_factory):
    """A soup run that crashed after 12 evaluations, then was rerun to the end."""
    cfg = soup_clone(evaluated_demo, tmp_path_factory.mktemp("souped") / "out", *REFERENCE_ROWS)
    mp = pytest.MonkeyPatch()
    patched_pool(mp, 12, [])
    with pytest.raises(RuntimeError, match="injected crash"):
        stage.run_soup(cfg, **QUIET)
    assert not storage.exists(layout.latest_pointer(cfg))  # nothing published
    root = layout.soup_memo_root(cfg)
    journaled = {json.loads(line)["key"] for d in storage.listdir(root)
                 for part in storage.listdir(storage.join(root, d)) if part.startswith("part-")
                 for line in storage.read_bytes(storage.join(root, d, part)).decode().splitlines()}
    seen: list = []
    patched_pool(mp, None, seen)
    report = stage.run_soup(cfg, **QUIET)
    mp.undo()
    keys = MemoEvaluator(None, None, [i.sha256 for i in load_inputs(cfg).ingredients])
    second = [keys.key(b) for b in seen]
    return {"cfg": cfg, "report": report, "journaled": journaled, "second": second}


def test_a_crashed_search_resumes_from_its_memo(souped, reference_search):
    assert len(souped["journaled"]) >= 4  # the crash came mid-search, after some batches were journaled
    assert not souped["journaled"] & set(souped["second"])  # nothing journaled was evaluated again
    report = souped["report"]
    for name, beta in reference_search.betas.items():  # the same result as an uninterrupted run
        np.testing.assert_array_equal(np.array(report["methods"][name]["beta"]), beta, err_msg=name)
    assert report["evaluations"]["from_memo"] >= len(souped["journaled"])


def test_the_report_has_every_method_and_its_mixture(souped):
    report, cfg = souped["report"], souped["cfg"]
    assert list(report["methods"]) == METHODS
    ids = [r["id"] for r in storage.read_json(layout.registry_uri(cfg))["ingredients"] if r["status"] == "ok"]
    for name in NOT_MIXTURES:
        assert report["methods"][name]["beta"] == [] and report["methods"][name]["ingredients"] == []
    for name in (n for n in METHODS if n not in NOT_MIXTURES):
        m = report["methods"][name]
        assert m["ingredients"] == sorted(ids)
        beta = np.array(m["beta"])
        assert beta.shape == (len(ids), len(report["components"]))
        np.testing.assert_allclose(beta.sum(axis=0), 1.0, atol=1e-9)
        assert m["ood_avg"] == pytest.approx(np.mean(list(m["ood"].values())))
    assert report["seed"] == cfg.soup.seed and report["config"]["soup"] == cfg.soup.model_dump(mode="json")
    assert isinstance(report["phase2_kept"], bool) and "torch" in report["versions"]
    assert set(report["ingredient_scores"]) == set(ids)
    evals = [n for n, _ in report["search_trace"]]
    assert evals == sorted(evals) and report["search_trace"][-1][1] >= report["methods"]["mmms"]["search_val"]
    # mmms never loses to the ingredient it starts from
    assert report["methods"]["mmms"]["val"] >= report["methods"]["best_individual"]["val"]


def test_the_run_directory_is_published_and_verified(souped):
    cfg, report = souped["cfg"], souped["report"]
    run_id = storage.read_pointer(layout.latest_pointer(cfg))
    assert run_id == report["run_id"] and layout.read_marker(cfg, "soup")["run_id"] == run_id
    run = publish.run_uri(cfg, run_id)
    manifest = storage.verify(run)
    assert {"fused/open_clip_config.json", "fused/open_clip_model.safetensors", "fused/head.safetensors",
            "fused/classnames.json", "report.json", "report.md", "id_vs_ood.png", "beta_mmms.png",
            "search_trace.png"} <= set(manifest["files"])
    assert storage.read_json(storage.join(run, "report.json")) == report
    md = storage.read_bytes(storage.join(run, "report.md")).decode()
    assert "| mmms |" in md and "[" in md  # the table with intervals
    assert [n for n in storage.listdir(layout.soup_root(cfg)) if n.startswith("scratch")] == []


def decoded_splits(cfg, preprocess):
    from pipeline.data.shards import decode_split, read_split

    out = {}
    for name, split in layout.splits(cfg).items():
        if split.role in ("val", "id_test", "ood"):
            out[name] = decode_split(read_split(split.uri), preprocess)
    return out


def accuracies(classifier, splits) -> dict[str, float]:
    with torch.inference_mode():
        return {name: int((classifier(x).argmax(-1) == y).sum()) / len(y) for name, (x, y) in splits.items()}


def report_accuracies(method: dict, report: dict) -> dict[str, float]:
    s = report["splits"]
    return {s["val"]: method["val"], s["id_test"]: method["id_test"], **method["ood"]}


def test_the_published_model_reproduces_the_mmms_numbers(souped):
    import open_clip

    from pipeline import load_fused

    cfg, report = souped["cfg"], souped["report"]
    classifier, preprocess, class_names = load_fused(cfg.output_uri)
    fused_dir = storage.join(publish.run_uri(cfg, report["run_id"]), "fused")
    clip, _, _ = open_clip.create_model_and_transforms(f"local-dir:{fused_dir}")
    for name, tensor in clip.visual.state_dict().items():  # what load_fused gave is open_clip's own model
        assert torch.equal(tensor, classifier.visual.state_dict()[name]), name
    assert class_names == storage.read_json(layout.registry_uri(cfg))["class_names"]
    splits = decoded_splits(cfg, preprocess)
    assert accuracies(classifier, splits) == report_accuracies(report["methods"]["mmms"], report)


def test_the_card_is_a_hub_card_and_its_recipe_reproduces_the_numbers(souped):
    """fused/README.md parses as a Hub model card whose model-index holds the mmms numbers, and
    the folder loaded as the card says (open_clip local-dir: plus the head) scores them."""
    import open_clip
    from huggingface_hub import ModelCard
    from safetensors.torch import load_file

    cfg, report = souped["cfg"], souped["report"]
    fused_dir = storage.join(publish.run_uri(cfg, report["run_id"]), "fused")
    card = ModelCard.load(f"{fused_dir}/README.md")
    assert card.data.library_name == "open_clip" and card.data.pipeline_tag == "image-classification"
    assert card.data.license == "apache-2.0" and card.data.base_model is None  # the demo base is not on the Hub
    expected = {name: round(100 * acc, 2) for name, acc in report_accuracies(report["methods"]["mmms"], report).items()}
    assert {r.dataset_name: r.metric_value for r in card.data.eval_results} == expected
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{fused_dir}")
    head = load_file(f"{fused_dir}/head.safetensors")
    model.eval()
    splits = decoded_splits(cfg, preprocess)
    with torch.inference_mode():
        got = {name: int(((torch.nn.functional.normalize(model.encode_image(x), dim=-1) @ head["weight"].T
                           + head["bias"]).argmax(-1) == y).sum()) / len(y) for name, (x, y) in splits.items()}
    assert got == report_accuracies(report["methods"]["mmms"], report)


def test_predict_classifies_image_files(souped, tmp_path):
    from pipeline.data.shards import read_split
    from pipeline.errors import UserError
    from pipeline.fused import predict_files

    cfg = souped["cfg"]
    split = read_split(layout.splits(cfg)["val"].uri)
    paths = []
    for i, data in enumerate(split.table.column("image").to_pylist()[:3]):
        paths.append(str(tmp_path / f"img{i}.png"))
        (tmp_path / f"img{i}.png").write_bytes(data)
    out = predict_files(cfg.output_uri, paths, top=3)
    assert [p for p, _ in out] == paths
    for _, preds in out:
        assert len(preds) == 3 and all(name in split.class_names for name, _ in preds)
        probs = [p for _, p in preds]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match="notes.txt"):
        predict_files(cfg.output_uri, [str(tmp_path / "notes.txt")])
    with pytest.raises(UserError, match="holds no fused model"):
        predict_files(str(tmp_path), paths)


def test_every_baseline_rebuilt_from_its_beta_matches_its_numbers(souped):
    from pipeline.model import components, image_transform, load_classifier
    from pipeline.model.classifier import classifier_from_state

    cfg, report = souped["cfg"], souped["report"]
    from pipeline.finetune import read_registry

    rows = {r["id"]: r for r in read_registry(cfg)["ingredients"]}
    ref, meta = load_classifier(rows[report["methods"]["mmms"]["ingredients"][0]]["checkpoint_uri"])
    comps = components(ref, cfg.soup.granularity)
    splits = decoded_splits(cfg, image_transform(meta["preprocess"]))
    for name in ["best_individual", "uniform_soup", "greedy_soup", "mmms_phase1"]:
        m = report["methods"][name]
        states = [load_classifier(rows[i]["checkpoint_uri"])[0].state_dict() for i in m["ingredients"]]
        clf = classifier_from_state(meta["model_name"], fuse(states, np.array(m["beta"]), comps),
                                    len(meta["class_names"])).eval()
        assert accuracies(clf, splits) == report_accuracies(m, report), name
    zs = report["methods"]["zero_shot"]
    evaluated = load_inputs(cfg).evaluations["zero_shot"]
    assert report_accuracies(zs, report) == {s: v["accuracy"] for s, v in evaluated.items()}


def test_a_finished_soup_is_skipped(souped, monkeypatch):
    cfg = souped["cfg"]
    monkeypatch.setattr(pool_lib, "evaluator_pool", lambda *a, **k: pytest.fail("a finished soup started evaluators"))
    runs = [n for n in storage.listdir(layout.soup_root(cfg)) if n[:1].isdigit()]
    assert stage.run_soup(cfg, **QUIET) == souped["report"]
    assert [n for n in storage.listdir(layout.soup_root(cfg)) if n[:1].isdigit()] == runs


def test_the_memo_context_holds_what_an_accuracy_depends_on(souped):
    cfg = souped["cfg"]
    inputs, val, _ = search_inputs(cfg)

    def memo(c):
        return Memo.open(layout.soup_memo_root(c), memo_context(c, inputs.components, val))

    assert len(memo(cfg)) > 0  # the run's own memo
    # search settings and the evaluator count change which mixtures are asked, not their accuracy
    for override in ["soup.num_evaluators=3", "soup.val_shards=3", "evaluate.working_set_gb=0.5", "soup.tau=0.99", "soup.num_workers=3", "soup.optimizer=TwoPointsDE"]:
        assert memo(tiny_config(cfg.output_uri, *SOUP, override, SHARED_CPUS)).uri == memo(cfg).uri, override
    # the evaluator's precision does change an accuracy
    other = memo(tiny_config(cfg.output_uri, *SOUP, "evaluate.ingredient_dtype=bfloat16"))
    assert other.uri != memo(cfg).uri and len(other) == 0
    # a batch's logits may depend on its size: the batch size is in the context
    assert memo(tiny_config(cfg.output_uri, *SOUP, "evaluate.batch_size=7")).uri != memo(cfg).uri


# ---- publishing -----------------------------------------------------------------------------

def test_a_crash_mid_upload_leaves_the_previous_result_in_force(tmp_path, monkeypatch):
    cfg = tiny_config(str(tmp_path / "out"))
    files = {"fused/a.bin": b"a" * 100, "fused/b.bin": b"b" * 50, "report.json": b"{}", "report.md": b"# r\n"}
    publish.publish_run(cfg, "run-1", files)
    assert storage.read_pointer(layout.latest_pointer(cfg)) == "run-1"

    real_write = storage.write_bytes
    writes = []

    def failing_write(uri, data):
        writes.append(uri)
        if len(writes) == 3:
            raise storage.StorageError(f"injected failure writing {uri}")
        real_write(uri, data)

    monkeypatch.setattr(storage, "write_bytes", failing_write)
    with pytest.raises(storage.StorageError, match="injected failure"):
        publish.publish_run(cfg, "run-2", {**files, "report.json": b'{"new": 1}'})
    monkeypatch.undo()
    assert storage.read_pointer(layout.latest_pointer(cfg)) == "run-1"
    storage.verify(publish.run_uri(cfg, "run-1"))
    assert not storage.exists(publish.run_uri(cfg, "run-2"))
    with pytest.raises(storage.StorageError, match="never reused"):
        publish.publish_run(cfg, "run-1", files)


def test_a_crash_before_the_pointer_moves_keeps_latest(tmp_path, monkeypatch):
    cfg = tiny_config(str(tmp_path / "out"))
    files = {"report.json": b"{}"}
    publish.publish_run(cfg, "run-1", files)
    real_verify = storage.verify
    monkeypatch.setattr(storage, "verify", lambda *a: (_ for _ in ()).throw(storage.StorageError("injected verify")))
    with pytest.raises(storage.StorageError, match="injected verify"):
        publish.publish_run(cfg, "run-2", files)
    monkeypatch.setattr(storage, "verify", real_verify)
    assert storage.read_pointer(layout.latest_pointer(cfg)) == "run-1"
    assert not storage.exists(publish.run_uri(cfg, "run-2"))


# ---- s3 -------------------------------------------------------------------------------------

def test_s3_round_trip(evaluated_demo, s3_bucket, tmp_path):
    from pipeline import load_fused
    from pipeline.ingredients import read_registry, write_registry

    uri = f"{s3_bucket}/soup-s3"
    upload(evaluated_demo.output_uri, uri)
    cfg = tiny_config(uri, *SOUP)
    registry = read_registry(cfg)
    for row in registry["ingredients"]:  # the copied ingredients, not the local originals
        row["checkpoint_uri"] = layout.ingredient_uri(cfg, row["id"])
    write_registry(cfg, registry)
    report = stage.run_soup(cfg, **QUIET)
    run_id = storage.read_pointer(layout.latest_pointer(cfg))
    assert run_id == report["run_id"]
    storage.verify(publish.run_uri(cfg, run_id))
    classifier, preprocess, _ = load_fused(uri)
    val = decoded_splits(cfg, preprocess)
    assert accuracies(classifier, val)["val"] == report["methods"]["mmms"]["val"]
    for where in [publish.run_uri(cfg, run_id), storage.join(publish.run_uri(cfg, run_id), "fused")]:
        other, _, _ = load_fused(where)
        assert torch.equal(other.head.weight, classifier.head.weight)


# ---- refusals -------------------------------------------------------------------------------

def test_an_ingredient_of_another_architecture_is_refused_by_name(evaluated_demo, tmp_path):
    from pipeline.ingredients import read_registry, write_registry
    from pipeline.model import save_classifier
    from pipeline.model.classifier import init_classifier
    from pipeline.model.factory import model_config

    cfg = soup_clone(evaluated_demo, tmp_path / "out")
    registry = read_registry(cfg)
    name = registry["model_name"]
    narrow = model_config(name)
    narrow = {**narrow, "vision_cfg": {**narrow["vision_cfg"], "width": 32}}
    odd = init_classifier(name, len(registry["class_names"]), narrow)
    uri = layout.ingredient_uri(cfg, "ft-odd")
    data = save_classifier(uri, odd, model_name=name, class_names=registry["class_names"], preprocess={"size": 16,
                           "mean": [0.5] * 3, "std": [0.5] * 3})
    registry["ingredients"].append({**registry["ingredients"][0], "id": "ft-odd", "checkpoint_uri": uri,
                                    "sha256": storage.sha256(data)})
    write_registry(cfg, registry)
    with pytest.raises(SoupInputError, match=r"ingredient 'ft-odd' .* architecture"):
        stage.run_soup(cfg, **QUIET)
    assert not storage.exists(layout.soup_memo_root(cfg))  # refused before anything was evaluated


def test_a_changed_checkpoint_is_refused(evaluated_demo, tmp_path):
    from pipeline.ingredients import read_registry, write_registry

    cfg = soup_clone(evaluated_demo, tmp_path / "out")
    registry = read_registry(cfg)
    registry["ingredients"][1]["sha256"] = "0" * 64
    write_registry(cfg, registry)
    with pytest.raises(SoupInputError, match=f"ingredient '{registry['ingredients'][1]['id']}'.*sha256"):
        stage.run_soup(cfg, **QUIET)


def test_the_soup_needs_current_scores_of_every_ingredient(evaluated_demo, tmp_path):
    cfg = soup_clone(evaluated_demo, tmp_path / "out")
    storage.delete(layout.evaluate_memo_uri(cfg))  # scores gone: the soup must not guess them
    with pytest.raises(SoupInputError, match="no current score of 'zero_shot' on split 'val'.*frankensoup evaluate"):
        stage.run_soup(cfg, **QUIET)


# ---- the reference rows: WiSE-FT and the output ensemble ------------------------------------

def test_wise_ft_ends_are_the_zero_shot_model_and_the_best_individual_bit_for_bit(souped):
    from pipeline.soup.fusing import ModelServices

    cfg, report = souped["cfg"], souped["report"]
    inputs = load_inputs(cfg)
    services = ModelServices(cfg, inputs, "unused", split_names(cfg)[0])
    best = report["wise_ft"]["ingredient"]
    assert np.array(report["methods"]["best_individual"]["beta"])[inputs.ids.index(best)].all()
    ends = [services.zero_shot_state(), services.ingredient_state(inputs.ids.index(best))]
    C = services.n_components
    for alpha, end in ((0.0, ends[0]), (1.0, ends[1])):
        fused = services.fuse(ends, np.array([[1.0 - alpha] * C, [alpha] * C]))
        assert fused.keys() == end.keys()
        for name, t in end.items():
            assert fused[name].dtype == t.dtype and torch.equal(fused[name], t), (alpha, name)
    # and their val scores are those rows' scores
    by_alpha = report["wise_ft"]["val_by_alpha"]
    assert by_alpha["0"] == report["methods"]["zero_shot"]["val"]
    assert by_alpha["1"] == report["methods"]["best_individual"]["val"]
    alpha = report["wise_ft"]["alpha"]
    assert report["methods"]["wise_ft"]["val"] == by_alpha[f"{alpha:g}"] == max(by_alpha.values())


def test_the_output_ensemble_is_the_argmax_of_the_mean_logits(souped):
    from pipeline.data.shards import decode_split, read_split
    from pipeline.scoring import split_scoring
    from pipeline.model import image_transform, load_classifier

    cfg, report = souped["cfg"], souped["report"]
    inputs = load_inputs(cfg)
    _, id_test, _ = split_names(cfg)
    split_cfg = layout.splits(cfg)[id_test]
    split = read_split(split_cfg.uri)
    images, labels = decode_split(split, image_transform(inputs.meta["preprocess"], train=False))
    scoring = split_scoring(id_test, split_cfg, split.class_names, list(inputs.meta["class_names"]))
    with torch.inference_mode():
        logits = [load_classifier(i.uri)[0].eval()(images) for i in inputs.ingredients]
    mean = torch.stack(logits).mean(dim=0)
    by_hand = (mean.argmax(dim=1).numpy() == scoring.target_of_label[labels.numpy()]).mean()
    assert report["methods"]["output_ensemble"]["id_test"] == pytest.approx(by_hand, abs=1e-12)
    singles = [(lg.argmax(dim=1).numpy() == scoring.target_of_label[labels.numpy()]).mean() for lg in logits]
    assert sorted(singles) == sorted(report["ingredient_scores"][i]["id_test"] for i in inputs.ids)


def test_the_report_tests_mmms_against_every_row_on_the_same_images(souped):
    report = souped["report"]
    tests = report["mcnemar"]["tests"]
    id_test, ood = report["splits"]["id_test"], report["splits"]["ood"]
    assert report["mcnemar"]["reference"] == "mmms" and set(tests) == set(METHODS) - {"mmms"}
    n = report["split_sizes"][id_test]
    for name, by_split in tests.items():
        assert set(by_split) == {id_test, *ood}
        t = by_split[id_test]
        # the discordant pairs account exactly for the difference in correct images
        diff = round((report["methods"]["mmms"]["id_test"] - report["methods"][name]["id_test"]) * n)
        assert t["reference_only"] - t["other_only"] == diff and 0.0 <= t["p"] <= 1.0
    if not report["phase2_kept"]:  # the same model: no discordant image
        assert tests["mmms_phase1"][id_test] == {"reference_only": 0, "other_only": 0, "p": 1.0}
