"""Images/s of `import-images` (one pass, shards written by Ray tasks) vs the plain serial way
it replaced (decode every file to check it, then read each again and write the shards, all in
one process), on the same generated folder.

The folder holds ``--classes`` x ``--per-class`` JPEGs of ``--size`` pixels (random noise,
so they do not compress to nothing and take a real decoder's time). Each side runs
``--repeats`` times, alternating; the best run of each is compared (the least disturbed by
other work on the machine), the medians are printed too. Both outputs are checked to be the
same bytes. The last line of stdout is ``ratio=<new/serial>``.

    python bench/import_images.py                       # 2,000 images of 256 px in a temp dir
    python bench/import_images.py --per-class 500 --size 384 --num-cpus 8
"""
from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_folder(root: str, classes: int, per_class: int, size: int, seed: int = 0) -> int:
    """root/class-<i>/<j>.jpg of random pixels; returns the number of images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = os.path.join(root, f"class-{c:03d}")
        os.makedirs(folder, exist_ok=True)
        for j in range(per_class):
            # smooth noise: JPEG-sized like a photo, not like pure noise
            small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((size, size), Image.BILINEAR)
            sink = io.BytesIO()
            img.save(sink, format="JPEG", quality=90)
            with open(os.path.join(folder, f"{j:05d}.jpg"), "wb") as f:
                f.write(sink.getvalue())
    return classes * per_class


def plain_import(src_dir: str, out_uri: str, *, name: str | None = None, role: str = "ood",
                 class_names: list[str] | None = None, folder_classes: dict[str, str] | None = None,
                 only_listed: bool = False, shuffle_seed: int | None = None, holdout: float = 0.0,
                 holdout_uri: str | None = None, rows_per_shard: int = 512) -> dict:
    """The import as it was before it ran on Ray: list, decode every file once to check it,
    then read every file again while writing the shards, serially. Same choices of rows,
    order, holdout and shards as `pipeline.data.images.import_image_folder`."""
    import posixpath

    from pipeline import storage
    from pipeline.data.images import class_folders, list_labelled_files
    from pipeline.data.shards import check_class_names, decode_image, remove_split, write_split

    class FileBytes:
        def __init__(self, uris):
            self.uris = uris

        def __len__(self):
            return len(self.uris)

        def __getitem__(self, i):
            if isinstance(i, slice):
                return [storage.read_bytes(u) for u in self.uris[i]]
            return storage.read_bytes(self.uris[i])

    if class_names is None:
        class_names = sorted(set(folder_classes.values())) if folder_classes is not None else class_folders(src_dir)
    class_names = check_class_names(class_names, f"import {src_dir}")
    files = list_labelled_files(src_dir, class_names, folder_classes, only_listed).files
    for f in files:
        decode_image(storage.read_bytes(f.uri), source=f.uri)
    if shuffle_seed is not None:
        order = random.Random(shuffle_seed).sample(range(len(files)), len(files))
        files = [files[i] for i in order]
    name = name or posixpath.basename(src_dir.rstrip("/")) or "images"
    held = []
    if holdout > 0:
        picked = set(random.Random(shuffle_seed or 0).sample(range(len(files)), round(holdout * len(files))))
        held = [f for i, f in enumerate(files) if i in picked]
        files = [f for i, f in enumerate(files) if i not in picked]
        write_split(holdout_uri, FileBytes([f.uri for f in held]), [f.label for f in held],
                    name=f"{name}-holdout", role="val", class_names=class_names, rows_per_shard=rows_per_shard)
    try:
        info = write_split(out_uri, FileBytes([f.uri for f in files]), [f.label for f in files],
                           name=name, role=role, class_names=class_names, rows_per_shard=rows_per_shard)
    except BaseException:
        if held:
            remove_split(holdout_uri)
        raise
    return {**info, "holdout_rows": len(held)}


def shard_bytes(uri: str) -> dict[str, bytes]:
    return {n: open(os.path.join(uri, n), "rb").read() for n in sorted(os.listdir(uri)) if n.endswith(".parquet")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rows-per-shard", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-cpus", type=int, default=None, help="local Ray's CPUs (default: all)")
    ap.add_argument("--dir", help="work here instead of a temp dir")
    args = ap.parse_args()

    import ray

    from pipeline import console
    from pipeline.data.images import import_image_folder
    from pipeline.raycluster import connect

    work = args.dir or tempfile.mkdtemp(prefix="bench-import-")
    src = os.path.join(work, "images")
    t0 = time.perf_counter()
    n = make_folder(src, args.classes, args.per_class, args.size)
    mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(src) for f in fs) / 2**20
    print(f"folder: {n} JPEGs of {args.size} px in {args.classes} classes, {mb:.0f} MiB "
          f"(made in {time.perf_counter() - t0:.1f}s)")
    console.configure(console.QUIET)
    connect("local", args.num_cpus)
    print(f"ray: {int(ray.cluster_resources().get('CPU', 0))} CPUs; rows_per_shard {args.rows_per_shard}")

    rates: dict[str, list[float]] = {"serial": [], "new": []}
    for r in range(args.repeats):
        for side in ("serial", "new"):
            out = os.path.join(work, f"out-{side}")
            t0 = time.perf_counter()
            if side == "serial":
                plain_import(src, out, shuffle_seed=0, rows_per_shard=args.rows_per_shard)
            else:
                import_image_folder(src, out, shuffle_seed=0, rows_per_shard=args.rows_per_shard)
            rate = n / (time.perf_counter() - t0)
            rates[side].append(rate)
            print(f"run {r + 1} {side:6s} {rate:8.0f} images/s")
    same = shard_bytes(os.path.join(work, "out-serial")) == shard_bytes(os.path.join(work, "out-new"))
    print(f"same shard bytes: {same}")
    for side in ("serial", "new"):
        print(f"{side:6s} best {max(rates[side]):8.0f} images/s, median {statistics.median(rates[side]):8.0f}")
    print(f"ratio={max(rates['new']) / max(rates['serial']):.2f}")


if __name__ == "__main__":
    main()
