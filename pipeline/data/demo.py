"""The offline demo dataset: scikit-learn's bundled digits (1,797 8x8 images, no download),
split into disjoint stratified pretrain/train/val/id_test sets, plus deterministic
distribution-shift sets (role ``ood``) made from the id_test images with scikit-image."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .. import storage
from ..config import DEMO_SHIFTS, DEMO_SPLITS, ConfigError, DemoDataConfig
from .shards import encode_png, write_split

DIGIT_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass
class DemoSplit:
    name: str
    role: str
    images: list[bytes]  # PNG, grayscale
    labels: list[int]


# ---- the digits and their split ---------------------------------------------------------------

def load_digit_images(upsample: int) -> tuple[np.ndarray, np.ndarray]:
    """All digits as float images in [0, 1] of size 8*upsample (bilinear), and their labels."""
    from skimage.transform import resize
    from sklearn.datasets import load_digits

    digits = load_digits()
    size = 8 * upsample
    # the bundled digits are 0..16 intensities
    images = np.stack([resize(im / 16.0, (size, size), order=1, mode="edge", anti_aliasing=False)
                       for im in digits.images])
    return np.clip(images, 0.0, 1.0), digits.target.astype(np.int64)


def split_sizes(cfg: DemoDataConfig, n: int, n_classes: int) -> dict[str, int]:
    """Rows per in-distribution split; id_test gets the remainder. Each must hold every class."""
    fractions = {"pretrain": cfg.pretrain, "train": cfg.train, "val": cfg.val}
    sizes = {k: int(round(f * n)) for k, f in fractions.items()}
    sizes["id_test"] = n - sum(sizes.values())
    for key, size in sizes.items():
        if size < n_classes:
            raise ConfigError(f"data.demo: the {key} split would get {size} of {n} digits, fewer than "
                              f"one per class (pretrain + train + val must leave room for id_test)")
    return sizes


def stratified_split(labels: np.ndarray, sizes: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Disjoint, class-stratified row indices per split (sorted), the last split taking the rest."""
    from sklearn.model_selection import train_test_split

    rest = np.arange(len(labels))
    out = {}
    names = list(sizes)
    for name in names[:-1]:
        rest, taken = train_test_split(rest, test_size=sizes[name], stratify=labels[rest], random_state=seed)
        out[name] = np.sort(taken)
    out[names[-1]] = np.sort(rest)
    return out


# ---- distribution shifts ----------------------------------------------------------------------
# Each takes float images (N, H, W) in [0, 1], the upsample factor and a seeded rng. Strengths
# were chosen so a decent digits classifier loses accuracy without falling to chance.

def shift_noise(images: np.ndarray, upsample: int, rng: np.random.Generator) -> np.ndarray:
    from skimage.util import random_noise

    return np.stack([random_noise(im, mode="gaussian", var=0.45 ** 2, rng=rng, clip=True) for im in images])


def shift_blur(images: np.ndarray, upsample: int, rng: np.random.Generator) -> np.ndarray:
    from skimage.filters import gaussian

    # sigma in original 8x8 pixels, so the strength does not depend on upsample
    return np.stack([gaussian(im, sigma=0.9 * upsample, mode="constant", cval=0.0) for im in images])


def shift_rotate(images: np.ndarray, upsample: int, rng: np.random.Generator) -> np.ndarray:
    from skimage.transform import rotate

    angles = rng.uniform(25.0, 35.0, len(images)) * rng.choice([-1.0, 1.0], len(images))
    return np.stack([rotate(im, a, order=1, mode="constant", cval=0.0) for im, a in zip(images, angles)])


def shift_invert(images: np.ndarray, upsample: int, rng: np.random.Generator) -> np.ndarray:
    from skimage.util import invert

    # one random quadrant in inverted colours: a full negative flips the stroke polarity and
    # sends every classifier trained on white-on-black digits to 0 %, below chance
    out = images.copy()
    h, w = images.shape[1] // 2, images.shape[2] // 2
    for im, (r, c) in zip(out, rng.integers(0, 2, size=(len(images), 2))):
        im[r * h:(r + 1) * h, c * w:(c + 1) * w] = invert(im[r * h:(r + 1) * h, c * w:(c + 1) * w])
    return out


def shift_sketch(images: np.ndarray, upsample: int, rng: np.random.Generator) -> np.ndarray:
    from skimage.filters import sobel

    # a pencil sketch: stroke outlines at full contrast over a faint fill of the stroke
    edges = np.stack([sobel(im) for im in images])
    edges = edges / np.maximum(edges.max(axis=(1, 2), keepdims=True), 1e-8)
    return 0.75 * edges + 0.25 * images


SHIFTS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "noise": shift_noise, "blur": shift_blur, "rotate": shift_rotate,
    "invert": shift_invert, "sketch": shift_sketch,
}


def apply_shift(name: str, images: np.ndarray, upsample: int, seed: int) -> np.ndarray:
    if name not in SHIFTS:
        raise ConfigError(f"data.demo.shifts: unknown shift {name!r}; known: {list(DEMO_SHIFTS)}")
    rng = np.random.default_rng([seed, DEMO_SHIFTS.index(name)])
    return np.clip(SHIFTS[name](images, upsample, rng), 0.0, 1.0)


# ---- build and write --------------------------------------------------------------------------

def to_png(images: np.ndarray) -> list[bytes]:
    from skimage.util import img_as_ubyte

    return [encode_png(img_as_ubyte(im)) for im in images]


def build_demo_splits(cfg: DemoDataConfig) -> dict[str, DemoSplit]:
    """pretrain, train, val, id_test, then one ood set per ``cfg.shifts``; same cfg, same bytes."""
    images, labels = load_digit_images(cfg.upsample)
    sizes = split_sizes(cfg, len(labels), len(DIGIT_CLASSES))
    rows = stratified_split(labels, sizes, cfg.seed)
    out = {name: DemoSplit(name, role, to_png(images[rows[name]]), labels[rows[name]].tolist())
           for name, role in DEMO_SPLITS.items()}
    test_images, test_labels = images[rows["id_test"]], labels[rows["id_test"]].tolist()
    for shift in cfg.shifts:
        shifted = apply_shift(shift, test_images, cfg.upsample, cfg.seed)
        out[shift] = DemoSplit(shift, "ood", to_png(shifted), list(test_labels))
    return out


def write_demo_splits(root_uri: str, cfg: DemoDataConfig, rows_per_shard: int = 512) -> dict[str, str]:
    """Write every demo split to ``root_uri/<name>``; returns name -> URI."""
    uris = {}
    for name, split in build_demo_splits(cfg).items():
        uris[name] = storage.join(root_uri, name)
        write_split(uris[name], split.images, split.labels, name=name, role=split.role,
                    class_names=DIGIT_CLASSES, rows_per_shard=rows_per_shard)
    return uris
