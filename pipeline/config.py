"""One typed configuration for a whole run, loaded from YAML with ``--set dotted.key=value``
overrides. Every default serves the offline demo; a wrong value fails at load time with the
field's path in the message."""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import methodspec
from .errors import UserError

# soup sections that are methods' settings now (soup.methods.<name>), still accepted
METHOD_ALIASES = ("wise_ft", "output_ensemble")


class ConfigError(UserError, ValueError):
    """A configuration that cannot be used; the message names the field. ``problems``: one line
    per problem (``frankensoup config validate`` prints them)."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


class Strict(BaseModel):
    # each field's docstring (the string below it) is its description in `frankensoup config schema`
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


def neutral(default, **constraints):
    """A field that changes how fast or where work runs, never its result: content keys leave
    it out (pipeline/keys.py), so changing it reuses everything already computed."""
    return Field(default, json_schema_extra={"neutral": True}, **constraints)


def parse_failure(spec: str | None) -> tuple[int, int] | None:
    """finetune.inject_failure "N:E" -> (trial N, epoch E); E >= 2 so the retry has a checkpoint
    to resume from."""
    if not spec:
        return None
    try:
        trial, epoch = (int(p) for p in spec.split(":"))
    except ValueError:
        raise ValueError(f"{spec!r}: expected 'TRIAL:EPOCH', e.g. '1:2'") from None
    if epoch < 2:
        raise ValueError(f"{spec!r}: EPOCH must be >= 2 (epoch 1 leaves no checkpoint)")
    return trial, epoch


# The optimizers a soup accepts: each is deterministic from soup.seed alone (its own numpy
# random state, swapped in around every ask and tell: pipeline/soup/mmms.py), which
# tests/test_optimizers.py checks for each. NGOpt is accepted where it picks Cobyla: with one
# worker and at most NGOPT_MAX_EVALS_PER_DIM evaluations per dimension, whatever the dimension
# (every granularity, phase 1's passes and phase 2); beyond that it picks MetaModel, which
# crashes inside scikit-learn with numpy 2.x, or CMA.
OPTIMIZERS = ("Cobyla", "CMA", "TwoPointsDE", "NGOpt")
SEQUENTIAL_OPTIMIZERS = ("Cobyla", "NGOpt")  # one ask at a time: num_workers must be 1
NGOPT_MAX_EVALS_PER_DIM = 50


# What a shard set is for: the one list (data/shards.py checks dataset.json against it, the CLI's
# --role offers it, SplitConfig.role is its Literal).
ROLES = ("pretrain", "train", "val", "id_test", "ood")
Role = Literal[ROLES]


class SplitConfig(Strict):
    """One shard set (see docs/outputs.md for the schema)."""
    uri: str
    """Where the set's shards are: a path, file:// or s3:// URI (written by `import-images`)."""
    role: Role
    """What the set is for: pretrain (demo base only), train, val (what the soup search maximises), id_test or
    ood."""
    class_subset: list[str] | None = None
    """ImageNet-R/-A style: score only these class names (logits outside are masked)."""
    class_map: dict[str, list[str]] | None = None
    """ObjectNet style: the set's own class name -> one or more class names of the model."""
    objectnet_mappings: str | None = None
    """ObjectNet itself: the class_map is read from the `mappings/` folder ObjectNet ships (folder name ->
    ImageNet class ids); see docs/data.md."""

    @model_validator(mode="after")
    def _one_class_map(self):
        if self.class_map is not None and self.objectnet_mappings is not None:
            raise ValueError("give class_map or objectnet_mappings, not both")
        return self


# The demo's in-distribution splits, by name, with their roles (each is named after its role); its
# ood sets are DemoDataConfig.shifts. data/demo.py writes them, layout.py finds them.
DEMO_SPLITS = {"pretrain": "pretrain", "train": "train", "val": "val", "id_test": "id_test"}
# The shifts data/demo.py knows, in a fixed order: a shift's random stream depends on its place here,
# not on which shifts a run asks for.
DEMO_SHIFTS = ("noise", "blur", "rotate", "invert", "sketch")


class DemoDataConfig(Strict):
    """The offline demo's data: sklearn's 1,797 8x8 digits, split by fraction, plus shifted copies as ood sets."""
    seed: int = 0
    """Seed of the demo's split and shifts."""
    pretrain: float = Field(0.25, gt=0, lt=1)
    """Fraction of the digits for pretraining the demo base CLIP (the rest after train and val is id_test)."""
    train: float = Field(0.35, gt=0, lt=1)
    """Fraction of the digits for finetuning the ingredients."""
    val: float = Field(0.18, gt=0, lt=1)
    """Fraction of the digits for val, the split the soup search maximises."""
    shifts: list[Literal[DEMO_SHIFTS]] = list(DEMO_SHIFTS)
    """The ood sets: id_test with each of these distribution shifts applied."""
    upsample: int = Field(2, ge=1)
    """Scale factor of the stored images: 8x8 digits are stored at 16x16."""


class DataConfig(Strict):
    """Where the images come from."""
    source: Literal["demo", "shards"] = "demo"
    """"demo": prepare builds the digits shards under output_uri/data; "shards": use `splits`."""
    demo: DemoDataConfig = DemoDataConfig()
    """The demo's data (source: demo)."""
    splits: dict[str, SplitConfig] = {}
    """Your shard sets by name, each with its role (source: shards)."""
    rows_per_shard: int = Field(512, gt=0)
    """Images per shard file when prepare writes the demo shards."""


class DemoBaseConfig(Strict):
    """How `prepare` makes the offline demo CLIP (contrastive pretraining on `pretrain`)."""
    steps: int = Field(400, gt=0)
    """Contrastive pretraining steps."""
    batch_size: int = Field(10, gt=1)
    """Image-text pairs per step."""
    lr: float = Field(5e-4, gt=0)
    """AdamW learning rate."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    seed: int = 0
    """Seed of the initial weights and the batches."""
    threads: int = Field(1, ge=1)
    """torch threads while pretraining."""


class ModelConfig(Strict):
    """The base CLIP every ingredient is finetuned from, and its zero-shot head."""
    name: str = "frankensoup-demo-vit"
    """An open_clip model name (e.g. ViT-B-32), or frankensoup-demo-vit for the demo."""
    pretrained: str = "demo"
    """"demo" (made by `prepare`), an open_clip pretrained tag, or a local/remote weights file."""
    templates: list[str] | str = "demo"
    """Prompt templates for the zero-shot head: a list with "{}" for the class name, or the name of a set:
    "demo", "openai_imagenet"."""
    prompt_names: dict[str, str] | Literal["imagenet"] | None = None
    """The words the templates get for each class, when class names are ids: a mapping {class name: prompt
    name}, or "imagenet" (WordNet ids -> OpenAI's curated ImageNet names)."""
    demo_base: DemoBaseConfig = DemoBaseConfig()
    """How the demo base CLIP is pretrained (pretrained: demo)."""

    @model_validator(mode="after")
    def _activation_of_the_weights(self):
        problem = activation_mismatch(self.name, self.pretrained)
        if problem:
            raise ValueError(problem)
        return self


WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def activation_mismatch(name: str, pretrained: str) -> str | None:
    """Why open_clip tag ``pretrained`` does not fit model ``name``, or None: weights trained
    with QuickGELU (OpenAI's) on a GELU model, or the reverse, load without error (open_clip only
    warns) and compute another function. The weights' setting is open_clip's pretrained
    registry's (no download); a file, a folder or "demo" is not checked here."""
    if pretrained == "demo" or "/" in pretrained or "\\" in pretrained or pretrained.endswith(WEIGHT_SUFFIXES):
        return None
    import open_clip

    model = open_clip.get_model_config(name)
    if model is None:
        return None
    has = bool(model.get("quick_gelu", False))
    # the tag's own entry, or the one under the other activation's name (open_clip lists
    # "laion2b_s34b_b79k" under ViT-B-32 only, and "openai" under both)
    twin = name.removesuffix("-quickgelu") if name.endswith("-quickgelu") else f"{name}-quickgelu"
    tag = open_clip.get_pretrained_cfg(name, pretrained) or open_clip.get_pretrained_cfg(twin, pretrained)
    if not tag:
        return None
    wants = bool(tag.get("quick_gelu", False))
    if wants == has:
        return None
    base = name.removesuffix("-quickgelu")
    right = f"{base}-quickgelu" if wants else base
    if right not in open_clip.list_models() or not open_clip.get_pretrained_cfg(right, pretrained):
        right = None
    act = {True: "QuickGELU", False: "GELU"}
    return (f"model.name {name!r} with pretrained {pretrained!r}: those weights were trained with {act[wants]}, "
            f"the model uses {act[has]}" + (f"; use model.name {right!r}" if right else ""))


class Resources(Strict):
    """What Ray gives each task or actor."""
    cpu: float = Field(1.0, ge=0)
    """CPUs (fractions allowed)."""
    gpu: float = Field(0.0, ge=0)
    """GPUs (fractions allowed: 0.5 puts two on one GPU)."""


class SearchSpace(Strict):
    """The shape of model soups' sweep (hparam_info.json); the ImageNet configs give its ranges."""
    lr: tuple[float, float] = (1e-4, 3e-3)
    """Learning rate range, sampled log-uniform."""
    weight_decay: tuple[float, float] = (1e-4, 0.2)
    """Weight decay range, sampled log-uniform."""
    epochs: list[int] = [4, 6, 8]
    """Epoch counts to choose from."""
    label_smoothing: list[float] = [0.0, 0.1]
    """Label smoothing values to choose from."""
    randaugment_magnitude: list[float] = Field([0.0, 1.67, 3.33], min_length=1)
    """RandAugment M on timm's scale (rand-m{M}-n{N}: M/10 of each op's largest change, M above 10 counts as 10
    as in timm); 0 = off. The demo's 1.67 and 3.33 are torchvision's 5 and 10 of its 31 bins, the magnitudes the
    demo always used."""
    randaugment_ops: list[int] = Field([2], min_length=1)
    """RandAugment N: ops per image to choose from; 0 = off."""
    mix_prob: list[float] = [0.0, 0.3]
    """Mixup/cutmix probabilities to choose from."""

    @field_validator("randaugment_magnitude", "randaugment_ops")
    @classmethod
    def _not_negative(cls, v: list) -> list:
        if any(x < 0 for x in v):
            raise ValueError(f"must be >= 0, got {v}")
        return v


class LinearProbeConfig(Strict):
    """The linear probe every trial starts from with finetune.init: linear_probe: a linear head trained on the
    base's frozen image features of the train split, from the zero-shot head, computed once."""
    epochs: int = Field(10, gt=0)
    """Passes over the cached train features."""
    lr: float = Field(0.01, gt=0)
    """AdamW learning rate of the head (its rows start at the zero-shot head's, scaled by CLIP's logit scale)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay of the head."""
    batch_size: int = Field(256, gt=0)
    """Cached features per probe step."""


class FinetuneConfig(Strict):
    """The Ray Tune sweep that trains the ingredients."""
    num_trials: int = Field(8, ge=0)
    """Finetunes to train (0: ingredients come from import-ingredients only)."""
    max_concurrent: int = neutral(2, gt=0)
    """Trials running at once."""
    seed: int = 0
    """Seed of the sweep's samples and of each trial's training."""
    batch_size: int = Field(32, gt=0)
    """Images per training step."""
    warmup_steps: int = Field(10, ge=0)
    """Linear learning-rate warmup steps (then cosine decay)."""
    grad_clip: float = Field(1.0, gt=0)
    """Gradient norm clip."""
    threads: int = Field(1, ge=1)
    """torch threads per trial."""
    max_failures: int = neutral(2, ge=0)
    """Retries of a failed trial (from its last checkpoint)."""
    resources: Resources = neutral(Resources())
    """What each trial gets."""
    space: SearchSpace = SearchSpace()
    """The hyperparameters each trial samples."""
    train_crop: Literal["center", "random_resized_flip"] = "center"
    """The training crop: "center", the eval resize and centre crop (the demo: digits must not be flipped);
    "random_resized_flip", a random resized crop (8-100 % of the area, aspect 3/4-4/3) and a horizontal flip before
    RandAugment, as timm's transforms_imagenet_train that model soups trained with (taken from the centre crop the
    images are kept or streamed at)."""
    loader: Literal["auto", "memory", "stream"] = "auto"
    """How a trial reads the train split: "memory" decodes it once and keeps it (uint8 at the model's input
    size); "stream" reads shard by shard each epoch through `loader_workers` processes with a shuffle buffer
    of `shuffle_buffer` images; "auto" streams when keeping it would take more than `memory_limit_gb`."""
    memory_limit_gb: float = Field(4.0, gt=0)
    """GiB of decoded train images a trial may keep in memory (loader: auto)."""
    loader_workers: int = Field(2, ge=0)
    """Decoding processes per trial when streaming."""
    shuffle_buffer: int = Field(4096, gt=0)
    """Encoded images per loader worker's shuffle buffer when streaming."""
    init: Literal["zero_shot", "linear_probe"] = "zero_shot"
    """Where every trial starts: "zero_shot", prepare's zero-shot classifier; "linear_probe", that classifier with
    its head replaced by a linear probe trained on the base's frozen train features (`linear_probe`), as model
    soups' ingredients started (docs/finetune.md)."""
    linear_probe: LinearProbeConfig = LinearProbeConfig()
    """The linear probe's settings (used with init: linear_probe)."""
    inject_failure: str | None = neutral(None)
    """Test hook: fail trial N once at epoch E ("N:E"); never set in a real config."""

    @field_validator("inject_failure")
    @classmethod
    def _failure_spec(cls, v: str | None) -> str | None:
        parse_failure(v)
        return v


class EvaluateConfig(Strict):
    """Scoring every ingredient on every split (Ray Data), and the soup's mixture evaluator."""
    batch_size: int = neutral(256, gt=0)
    """Images per scoring batch."""
    num_actors: int = neutral(1, gt=0)
    """Ray Data scoring actors."""
    resources: Resources = neutral(Resources())
    """What each scoring actor gets."""
    ingredient_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype the mixture evaluator holds ingredient weights in (bfloat16 halves its memory)."""
    memory_limit_gb: float | None = neutral(None)
    """GiB one evaluator may use for ingredient weights + val tensors (None: the device's)."""
    working_set_gb: float | None = neutral(None, gt=0)
    """GiB of ingredient rows one mixture evaluator keeps resident (None: all K may stay): rows load when a mixture
    first uses them, the least recently used is evicted (docs/evaluator.md)."""
    threads: int = Field(1, ge=1)
    """torch threads per scoring actor and evaluator."""


class Phase2Config(Strict):
    """MMMS phase 2: joint refinement of every mixing factor."""
    enabled: bool = True
    """Run phase 2 (its result is kept only if it improves val)."""
    bounds: tuple[float, float] = (0.7, 1.4)
    """Range of each factor mu (starting at 1)."""
    evals_per_dim: int = Field(50, gt=0)
    """Evaluation budget per dimension (ingredients x components)."""

    @field_validator("bounds")
    @classmethod
    def _mu_starts_inside(cls, v: tuple[float, float]) -> tuple[float, float]:
        low, high = v
        if not 0.0 < low <= 1.0 <= high:
            raise ValueError(f"must satisfy 0 < low <= 1 <= high (mu starts at 1), got {v}")
        return v


class SoupConfig(Strict):
    """The soup methods: baselines and the manifold mixing soup (MMMS) search."""
    granularity: Literal[0, 1, 2, 3, "reference"] = 2
    """Components: 0 whole model, 1 stem/transformer/head, 2 per block, 3 per tensor; "reference": the
    reference's level 1 without its text-tower groups (image tower, head weight, head bias), for like-for-like
    reproduction (docs/components.md)."""
    tau: float = Field(0.998, gt=0, le=1)
    """Phase 1 short-circuit: skip a candidate whose plain average falls below tau x the current accuracy."""
    bounds_delta: float = Field(0.5, gt=0, le=1)
    """Phase 1 search box half-width, as a fraction of (1 - lambda0)."""
    max_func_evals_per_dim: int = Field(30, gt=0)
    """Phase 1 evaluation budget per component."""
    second_pass_low: float = Field(0.3, ge=0, lt=1)
    """Lower bound of lambda in phase 1's second pass."""
    optimizer: str = "CMA"
    """One of OPTIMIZERS (Cobyla, CMA, TwoPointsDE, NGOpt), each deterministic from soup.seed; Cobyla and NGOpt
    only with num_workers=1."""
    num_workers: int = Field(4, ge=1)
    """W: candidate mixtures in flight per optimizer step (changes the search)."""
    num_evaluators: int = neutral(2, ge=1)
    """E: evaluator actors (never changes the result, only the speed)."""
    val_shards: int = neutral(1, ge=1)
    """S: shard tasks of whole val batches one evaluation is cut into, each run by any evaluator and summed (never
    changes the result; docs/evaluator.md)."""
    evaluator_resources: Resources = neutral(Resources())
    """What each evaluator actor gets."""
    seed: int = 123456789
    """The optimizer's seed."""
    phase2: Phase2Config = Phase2Config()
    """MMMS phase 2 (joint refinement)."""
    methods: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    """Every soup method's settings, by name: soup.methods.<name>.enabled and the method's own fields (declared by
    the method: pipeline/methodspec.py); the old soup.wise_ft and soup.output_ensemble keys still work and mean
    soup.methods.wise_ft / .output_ensemble."""
    publish: str = "mmms"
    """The method whose model is published (fused/), the reference of the paired tests and the subject of the
    model card and plots: an enabled method whose result is one model."""

    @model_validator(mode="before")
    @classmethod
    def _old_method_keys(cls, raw: Any) -> Any:
        if not isinstance(raw, dict) or not any(k in raw for k in METHOD_ALIASES):
            return raw
        raw = dict(raw)
        methods = dict(raw.get("methods") or {}) if isinstance(raw.get("methods") or {}, dict) else raw["methods"]
        for old in METHOD_ALIASES:
            if old not in raw:
                continue
            given = raw.pop(old)
            if isinstance(methods, dict) and isinstance(given, dict) and isinstance(methods.get(old, {}), dict):
                new = methods.get(old, {})
                clash = [k for k in given if k in new and new[k] != given[k]]
                if clash:
                    raise ValueError(f"soup.{old}.{clash[0]} and soup.methods.{old}.{clash[0]} differ: give one")
                methods[old] = {**given, **new}
            else:
                methods[old] = given
        raw["methods"] = methods
        return raw

    @field_validator("methods", mode="before")
    @classmethod
    def _method_settings(cls, raw: Any) -> dict:
        methods = methodspec.validate(raw)
        methodspec.check_enabled(methods)
        return methods

    @field_validator("publish")
    @classmethod
    def _publishable(cls, v: str, info) -> str:
        if "methods" in info.data:  # else the methods' own error is the one to read
            methodspec.check_publishable(info.data["methods"], v)
        return v

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, v: str) -> str:
        if v not in OPTIMIZERS:
            raise ValueError(f"{v!r} is not an accepted optimizer: use one of {', '.join(OPTIMIZERS)} "
                             "(each deterministic from soup.seed)")
        return v

    @model_validator(mode="after")
    def _optimizer_runs_with_num_workers(self):
        if self.num_workers > 1 and self.optimizer in SEQUENTIAL_OPTIMIZERS:
            # NGOpt's parallel pick is MetaModel, which crashes with numpy 2.x; Cobyla asks one at a time
            raise ValueError(f"soup.optimizer {self.optimizer!r} cannot run with soup.num_workers={self.num_workers} "
                             "> 1: it asks one point at a time (NGOpt would pick MetaModel, which crashes with "
                             "numpy 2.x); name one (CMA, TwoPointsDE) or set num_workers=1")
        most = max(self.max_func_evals_per_dim, self.phase2.evals_per_dim if self.phase2.enabled else 0)
        if self.optimizer == "NGOpt" and most > NGOPT_MAX_EVALS_PER_DIM:
            raise ValueError(f"soup.optimizer 'NGOpt' with {most} evaluations per dimension "
                             f"(soup.max_func_evals_per_dim, soup.phase2.evals_per_dim): above "
                             f"{NGOPT_MAX_EVALS_PER_DIM} it no longer picks Cobyla but MetaModel or CMA; "
                             "name the optimizer (CMA, Cobyla) or lower the budget")
        return self


class RayConfig(Strict):
    """Which Ray cluster to use."""
    address: str | None = neutral(None)
    """None: join the cluster `ray job submit` gives us (RAY_ADDRESS), or start a local one; "local": always
    start a local one; or a head's address."""
    num_cpus: int | None = neutral(None)
    """CPUs of a local cluster this process starts (None: all)."""
    autoscaling: bool = neutral(False)
    """The cluster adds nodes on demand: the dry run warns instead of failing when a requested resource (e.g.
    a GPU) is on no node yet, and says which worker types it will need."""
    cluster_yaml: str = neutral("ray_cluster.yaml")
    """The cluster launcher's YAML (available_node_types), read by the dry run with autoscaling."""


class StorageConfig(Strict):
    """Storage under output_uri."""
    shared: bool = neutral(False)
    """A local output_uri that every node mounts at the same path (NFS, EFS, FSx): allowed on a cluster of
    several nodes (otherwise use s3://; a node's own disk is invisible to the others)."""
    lease_ttl_s: float = neutral(60.0, gt=0)
    """A writer's lease on output_uri (pipeline/lease.py) whose heartbeat is older than this many seconds is taken
    over by the next writer; the holder beats every quarter of it."""


class ConsoleConfig(Strict):
    """What the console shows."""
    status_every_s: float = neutral(10.0, gt=0)
    """Seconds between progress status lines when the output is not a terminal (a bar otherwise)."""


class TrackingConfig(Strict):
    """Experiment tracking (docs/tracking.md): finetune trials' metrics and the soup's search
    trace and scores, for TensorBoard and, with ``mlflow_uri``, MLflow. Never changes a result."""
    tensorboard: bool = neutral(True)
    """Write TensorBoard event files."""
    tensorboard_uri: str | None = neutral(None)
    """Where the event files go (local path, file:// or s3://); None: <output_uri>/tracking/tensorboard."""
    mlflow_uri: str | None = neutral(None)
    """An MLflow tracking URI: a server (http://, https://, databricks), a database (sqlite:///...), or a file
    store (file:///... or a path); None: no MLflow."""
    mlflow_experiment: str = neutral("frankensoup", min_length=1)
    """The MLflow experiment runs are logged to."""

    @field_validator("tensorboard_uri")
    @classmethod
    def _storage_uri(cls, v: str | None) -> str | None:
        from .storage import SCHEMES, scheme_names

        if v is not None and (not v.strip() or ("://" in v and v.split("://", 1)[0] not in SCHEMES)):
            raise ValueError(f"must be a local path, {scheme_names()} URI; got {v!r}")
        return v

    @field_validator("mlflow_uri")
    @classmethod
    def _tracking_uri(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or v.startswith("s3://")):
            raise ValueError(f"must be an MLflow tracking URI (http(s)://, databricks, sqlite:///, file:///, "
                             f"or a path); an s3:// bucket only stores MLflow's artifacts; got {v!r}")
        return v


class CardConfig(Strict):
    """The Hugging Face Hub metadata of the published model card (fused/README.md)."""
    license: str = "apache-2.0"
    """The fused model's license, as a Hub license id (e.g. apache-2.0, mit, other): one your base weights
    and data allow."""
    datasets: list[str] = []
    """Hub ids of the datasets the model was finetuned and evaluated on (e.g. ILSVRC/imagenet-1k)."""
    tags: list[str] = []
    """Tags added to the card's own (clip, open_clip, model-soups, ...)."""


class Config(Strict):
    """A whole run: where it goes, the data, the base model and every stage's settings."""
    output_uri: str = "./frankensoup-output"
    """Where everything goes: a path, file:// or s3:// (honours AWS_ENDPOINT_URL)."""
    seed: int = 0
    """Not read by any stage: each has its own (data.demo.seed, finetune.seed, soup.seed)."""
    data: DataConfig = DataConfig()
    """The shards: the demo's, or your own sets by name and role."""
    model: ModelConfig = ModelConfig()
    """The base CLIP and its zero-shot head."""
    finetune: FinetuneConfig = FinetuneConfig()
    """The sweep that trains the ingredients."""
    evaluate: EvaluateConfig = EvaluateConfig()
    """Scoring the ingredients, and the mixture evaluator."""
    soup: SoupConfig = Field(default_factory=SoupConfig)  # built on use: its methods are found then
    """The soup methods and the MMMS search."""
    ray: RayConfig = RayConfig()
    """The Ray cluster."""
    storage: StorageConfig = StorageConfig()
    """Storage under output_uri."""
    console: ConsoleConfig = neutral(ConsoleConfig())
    """What the console shows."""
    tracking: TrackingConfig = neutral(TrackingConfig())
    """TensorBoard and MLflow."""
    card: CardConfig = CardConfig()
    """The published model card's Hub metadata."""

    def section_hash(self, *sections: str) -> str:
        """Stable hash of some top-level sections: a stage is redone when its hash changes."""
        dump = self.model_dump(mode="json")
        blob = json.dumps({s: dump[s] for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


DEFAULT_CONFIG_PATH = os.path.join("configs", "demo.yaml")


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p!r} is not a section")
        node[parts[-1]] = _parse_value(value)
    return raw


def _unwrap(node):
    """The model or dict type inside ``X | None``; None when there is no single one."""
    if isinstance(node, type) and issubclass(node, BaseModel) or get_origin(node) is dict:
        return node
    inner = [a for a in get_args(node) if _unwrap(a) is not None]
    return _unwrap(inner[0]) if len(inner) == 1 else None


def fields_at(loc) -> list[str]:
    """The keys allowed at a config path (a pydantic error's ``loc`` without its last part)."""
    node = _unwrap(Config)
    for part in loc:
        if node is None:
            return []
        if get_origin(node) is dict:  # a name of the user's (data.splits.<name>)
            node = _unwrap(get_args(node)[1])
        elif part in node.model_fields:
            node = _unwrap(node.model_fields[part].annotation)
        else:
            return []
    return list(node.model_fields) if isinstance(node, type) else []


def problems(e: ValidationError) -> list[str]:
    """One line per problem, each naming the field; an unknown key gets the closest known one."""
    lines = []
    for err in e.errors():
        path = ".".join(str(p) for p in err["loc"]) or "<root>"
        line = f"{path}: {err['msg']}"
        if err["type"] == "extra_forbidden" and err["loc"]:
            *parent, key = err["loc"]
            close = difflib.get_close_matches(str(key), fields_at(parent), n=1, cutoff=0.6)
            if close:
                line += f" (did you mean {'.'.join([*map(str, parent), close[0]])}?)"
        lines.append(line)
    return lines


def _format_error(e: ValidationError, source: str) -> str:
    return f"invalid config ({source}): " + "; ".join(problems(e))


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def substitute_env(raw: Any, source: str, path: str = "") -> Any:
    """``${VAR}`` and ``${VAR:-default}`` (default when VAR is unset or empty) in the YAML's
    strings, from the environment; an unset ``${VAR}`` without default fails naming it."""
    if isinstance(raw, dict):
        return {k: substitute_env(v, source, f"{path}.{k}" if path else str(k)) for k, v in raw.items()}
    if isinstance(raw, list):
        return [substitute_env(v, source, f"{path}[{i}]") for i, v in enumerate(raw)]
    if not isinstance(raw, str):
        return raw

    def value(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        found = os.environ.get(name)
        if found:
            return found
        if default is not None:
            return default
        if found is not None:
            return found
        raise ConfigError(f"invalid config ({source}): {path}: environment variable {name} is not set "
                          f"(write ${{{name}:-default}} for a default)")

    return _VARIABLE.sub(value, raw)


_USERINFO = re.compile(r"(?<=://)[^/?#@\s]+@")


def redact(text: str) -> str:
    """Credentials inside URIs hidden: ``https://user:secret@host`` -> ``https://***@host``."""
    return _USERINFO.sub("***@", text)


def redacted(cfg: Config) -> dict:
    """The resolved config as JSON-able data with every URI's credentials hidden: what report.json,
    run.json and the console show."""
    def walk(v):
        if isinstance(v, str):
            return redact(v)
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v

    return walk(cfg.model_dump(mode="json"))


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML (default: configs/demo.yaml when present, else the built-in demo defaults)."""
    raw: dict = {}
    source = "built-in demo defaults"
    if path is None and os.path.exists(DEFAULT_CONFIG_PATH):
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        source = path
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping at the top level")
        raw = substitute_env(raw, source)
    raw = apply_overrides(raw, overrides or [])
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source), problems(e)) from None
