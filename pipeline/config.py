"""One typed configuration for a whole run, loaded from YAML with ``--set dotted.key=value``
overrides. Every default serves the offline demo; a wrong value fails at load time with the
field's path in the message."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration that cannot be used; the message names the field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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


def _is_ngopt_family(name: str) -> bool:
    """Whether nevergrad's ``name`` is an NGOpt-family optimizer, one that picks another per
    problem (a configured optimizer's registry entry wraps the class it builds)."""
    import nevergrad as ng
    from nevergrad.optimization.optimizerlib import NGOptBase

    entry = ng.optimizers.registry[name]
    while not isinstance(entry, type):
        entry = entry._OptimizerClass
    return issubclass(entry, NGOptBase)


Role = Literal["pretrain", "train", "val", "id_test", "ood"]


class SplitConfig(Strict):
    """One shard set (see docs/outputs.md for the schema)."""
    uri: str
    role: Role
    # ImageNet-R/-A style: score only these class names (logits outside are masked)
    class_subset: list[str] | None = None
    # ObjectNet style: the set's own class name -> one or more class names of the model
    class_map: dict[str, list[str]] | None = None
    # ObjectNet itself: the class_map is read from the `mappings/` folder ObjectNet ships
    # (folder name -> ImageNet class ids); see docs/data.md
    objectnet_mappings: str | None = None

    @model_validator(mode="after")
    def _one_class_map(self):
        if self.class_map is not None and self.objectnet_mappings is not None:
            raise ValueError("give class_map or objectnet_mappings, not both")
        return self


class DemoDataConfig(Strict):
    seed: int = 0
    # fractions of the 1,797 digits; the rest is id_test
    pretrain: float = Field(0.25, gt=0, lt=1)
    train: float = Field(0.35, gt=0, lt=1)
    val: float = Field(0.18, gt=0, lt=1)
    shifts: list[Literal["noise", "blur", "rotate", "invert", "sketch"]] = ["noise", "blur", "rotate", "invert", "sketch"]
    upsample: int = Field(2, ge=1)  # 8x8 digits are stored at 16x16


class DataConfig(Strict):
    # "demo": prepare builds the digits shards under output_uri/data; "shards": use `splits`
    source: Literal["demo", "shards"] = "demo"
    demo: DemoDataConfig = DemoDataConfig()
    splits: dict[str, SplitConfig] = {}
    rows_per_shard: int = Field(512, gt=0)


class DemoBaseConfig(Strict):
    """How `prepare` makes the offline demo CLIP (contrastive pretraining on `pretrain`)."""
    steps: int = Field(400, gt=0)
    batch_size: int = Field(10, gt=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = 0.1
    seed: int = 0
    threads: int = Field(1, ge=1)


class ModelConfig(Strict):
    name: str = "frankensoup-demo-vit"
    # "demo" (made by `prepare`), an open_clip pretrained tag, or a local/remote weights file
    pretrained: str = "demo"
    # prompt templates for the zero-shot head: a list with "{}" for the class name,
    # or the name of a set: "demo", "openai_imagenet"
    templates: list[str] | str = "demo"
    # the words the templates get for each class, when class names are ids: a mapping
    # {class name: prompt name}, or "imagenet" (WordNet ids -> OpenAI's curated ImageNet names)
    prompt_names: dict[str, str] | Literal["imagenet"] | None = None
    demo_base: DemoBaseConfig = DemoBaseConfig()

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
    cpu: float = Field(1.0, ge=0)
    gpu: float = Field(0.0, ge=0)


class SearchSpace(Strict):
    """The shape of model soups' sweep (hparam_info.json); the ImageNet configs give its ranges."""
    lr: tuple[float, float] = (1e-4, 3e-3)            # log-uniform
    weight_decay: tuple[float, float] = (1e-4, 0.2)   # log-uniform
    epochs: list[int] = [4, 6, 8]
    label_smoothing: list[float] = [0.0, 0.1]
    # RandAugment M on timm's scale (rand-m{M}-n{N}: M/10 of each op's largest change, M above
    # 10 counts as 10 as in timm); 0 = off. The demo's 1.67 and 3.33 are torchvision's 5 and 10
    # of its 31 bins, the magnitudes the demo always used
    randaugment_magnitude: list[float] = Field([0.0, 1.67, 3.33], min_length=1)
    randaugment_ops: list[int] = Field([2], min_length=1)  # N: ops per image; 0 = off
    mix_prob: list[float] = [0.0, 0.3]                # mixup/cutmix probability

    @field_validator("randaugment_magnitude", "randaugment_ops")
    @classmethod
    def _not_negative(cls, v: list) -> list:
        if any(x < 0 for x in v):
            raise ValueError(f"must be >= 0, got {v}")
        return v


class FinetuneConfig(Strict):
    num_trials: int = Field(8, ge=0)  # 0: ingredients come from import-ingredients only
    max_concurrent: int = neutral(2, gt=0)
    seed: int = 0
    batch_size: int = Field(32, gt=0)
    warmup_steps: int = Field(10, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    threads: int = Field(1, ge=1)
    max_failures: int = neutral(2, ge=0)
    resources: Resources = neutral(Resources())
    space: SearchSpace = SearchSpace()
    # the training crop: "center", the eval resize and centre crop (the demo: digits must not be
    # flipped); "random_resized_flip", a random resized crop (8-100 % of the area, aspect 3/4-4/3)
    # and a horizontal flip before RandAugment, as timm's transforms_imagenet_train that model
    # soups trained with (taken from the centre crop the images are kept or streamed at)
    train_crop: Literal["center", "random_resized_flip"] = "center"
    # how a trial reads the train split: "memory" decodes it once and keeps it (uint8 at the
    # model's input size); "stream" reads shard by shard each epoch through `loader_workers`
    # processes with a shuffle buffer of `shuffle_buffer` images; "auto" streams when keeping it
    # would take more than `memory_limit_gb`
    loader: Literal["auto", "memory", "stream"] = "auto"
    memory_limit_gb: float = Field(4.0, gt=0)
    loader_workers: int = Field(2, ge=0)
    shuffle_buffer: int = Field(4096, gt=0)
    # test hook: fail trial N once at epoch E ("N:E"); never set in a real config
    inject_failure: str | None = neutral(None)

    @field_validator("inject_failure")
    @classmethod
    def _failure_spec(cls, v: str | None) -> str | None:
        parse_failure(v)
        return v


class EvaluateConfig(Strict):
    batch_size: int = neutral(256, gt=0)
    num_actors: int = neutral(1, gt=0)
    resources: Resources = neutral(Resources())
    # dtype the mixture evaluator holds ingredient weights in
    ingredient_dtype: Literal["float32", "bfloat16"] = "float32"
    # memory one evaluator may use for ingredient weights + val tensors (GiB; None = device's)
    memory_limit_gb: float | None = neutral(None)
    threads: int = Field(1, ge=1)


class Phase2Config(Strict):
    enabled: bool = True
    bounds: tuple[float, float] = (0.7, 1.4)
    evals_per_dim: int = Field(50, gt=0)

    @field_validator("bounds")
    @classmethod
    def _mu_starts_inside(cls, v: tuple[float, float]) -> tuple[float, float]:
        low, high = v
        if not 0.0 < low <= 1.0 <= high:
            raise ValueError(f"must satisfy 0 < low <= 1 <= high (mu starts at 1), got {v}")
        return v


class WiseFTConfig(Strict):
    """WiSE-FT (Wortsman et al. 2022): (1 - alpha) zero-shot + alpha best individual, in weight
    space, alpha the grid point with the best val accuracy (ties: the first)."""
    enabled: bool = True
    alphas: list[float] = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]

    @field_validator("alphas")
    @classmethod
    def _grid(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 <= a <= 1.0 for a in v) or len(set(v)) != len(v):
            raise ValueError(f"must be distinct numbers in [0, 1], at least one; got {v}")
        return v


class OutputEnsembleConfig(Strict):
    """The mean of every ingredient's logits: K forward passes per image (model soups' reference
    without a cost limit); scored on every split, so off for large K on large sets if need be."""
    enabled: bool = True


class SoupConfig(Strict):
    # component granularity: 0 whole model, 1 stem/transformer/head, 2 per block, 3 per tensor;
    # "reference": the reference's level 1 without its text-tower groups (image tower, head
    # weight, head bias), for like-for-like reproduction (docs/components.md)
    granularity: Literal[0, 1, 2, 3, "reference"] = 2
    tau: float = Field(0.998, gt=0, le=1)
    bounds_delta: float = Field(0.5, gt=0, le=1)
    max_func_evals_per_dim: int = Field(30, gt=0)
    second_pass_low: float = Field(0.3, ge=0, lt=1)
    optimizer: str = "CMA"  # any nevergrad optimizer name; NGOpt only with num_workers=1
    num_workers: int = Field(4, ge=1)   # W: asks in flight (changes the search)
    num_evaluators: int = neutral(2, ge=1)  # E: evaluator actors (never changes the result)
    evaluator_resources: Resources = neutral(Resources())
    seed: int = 123456789
    phase2: Phase2Config = Phase2Config()
    wise_ft: WiseFTConfig = WiseFTConfig()
    output_ensemble: OutputEnsembleConfig = OutputEnsembleConfig()

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, v: str) -> str:
        import nevergrad as ng

        if v not in ng.optimizers.registry:
            raise ValueError(f"unknown nevergrad optimizer {v!r}")
        return v

    @model_validator(mode="after")
    def _optimizer_runs_with_num_workers(self):
        if self.num_workers > 1 and _is_ngopt_family(self.optimizer):
            # its parallel pick is MetaModel, which crashes inside sklearn with numpy 2.x
            raise ValueError(f"soup.optimizer {self.optimizer!r} cannot run with soup.num_workers={self.num_workers} "
                             "> 1: it picks MetaModel, which crashes with numpy 2.x; name one (CMA, TwoPointsDE) "
                             "or set num_workers=1")
        return self


class RayConfig(Strict):
    # None: join the cluster `ray job submit` gives us, or start a local one
    address: str | None = neutral(None)
    num_cpus: int | None = neutral(None)
    # the cluster adds nodes on demand: the dry run warns instead of failing when a requested
    # resource (e.g. a GPU) is on no node yet, and says which worker types it will need
    autoscaling: bool = neutral(False)
    # the cluster launcher's YAML (available_node_types), read by the dry run with autoscaling
    cluster_yaml: str = neutral("ray_cluster.yaml")


class StorageConfig(Strict):
    # a local output_uri that every node mounts at the same path (NFS, EFS, FSx): allowed on a
    # cluster of several nodes (otherwise use s3://; a node's own disk is invisible to the others)
    shared: bool = neutral(False)


class ConsoleConfig(Strict):
    # seconds between progress status lines when the output is not a terminal (a bar otherwise)
    status_every_s: float = neutral(10.0, gt=0)


class TrackingConfig(Strict):
    """Experiment tracking (docs/tracking.md): finetune trials' metrics and the soup's search
    trace and scores, for TensorBoard and, with ``mlflow_uri``, MLflow. Never changes a result."""
    tensorboard: bool = neutral(True)
    # where the event files go (local path, file:// or s3://); None: <output_uri>/tracking/tensorboard
    tensorboard_uri: str | None = neutral(None)
    # an MLflow tracking URI: a server (http://, https://, databricks), a database
    # (sqlite:///...), or a file store (file:///... or a path); None: no MLflow
    mlflow_uri: str | None = neutral(None)
    mlflow_experiment: str = neutral("frankensoup", min_length=1)

    @field_validator("tensorboard_uri")
    @classmethod
    def _storage_uri(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or ("://" in v and v.split("://", 1)[0] not in ("file", "s3"))):
            raise ValueError(f"must be a local path, file:// or s3:// URI; got {v!r}")
        return v

    @field_validator("mlflow_uri")
    @classmethod
    def _tracking_uri(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or v.startswith("s3://")):
            raise ValueError(f"must be an MLflow tracking URI (http(s)://, databricks, sqlite:///, file:///, "
                             f"or a path); an s3:// bucket only stores MLflow's artifacts; got {v!r}")
        return v


class Config(Strict):
    output_uri: str = "./frankensoup-output"
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    soup: SoupConfig = SoupConfig()
    ray: RayConfig = RayConfig()
    storage: StorageConfig = StorageConfig()
    console: ConsoleConfig = neutral(ConsoleConfig())
    tracking: TrackingConfig = neutral(TrackingConfig())

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


def _format_error(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        path = ".".join(str(p) for p in err["loc"]) or "<root>"
        lines.append(f"{path}: {err['msg']}")
    return f"invalid config ({source}): " + "; ".join(lines)


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
    raw = apply_overrides(raw, overrides or [])
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None
