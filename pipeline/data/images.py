"""Import an image folder ``DIR/<class folder>/<file>`` (png/jpg/jpeg) as a shard set, in one
pass: each shard's images are read once, decoded (a file that does not decode is refused, or
skipped with ``skip_bad``) and written as they are, by Ray tasks when Ray is initialised (in
process otherwise). Which file lands in which shard is fixed before any is read, so the output
is the same bytes whatever the parallelism."""
from __future__ import annotations

import posixpath
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from .. import storage
from .shards import (DataError, check_class_names, check_role, clear_split, decode_image, finish_split, undo_split,
                     write_shard)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

Progress = Callable[[int, int], None]  # (images done, images in all)


@dataclass(frozen=True)
class LabelledFile:
    uri: str
    label: int
    rel: str  # "<class folder>/<file>": how reports name it


@dataclass
class Listing:
    files: list[LabelledFile]
    skipped_folders: list[str]
    not_images: list[str] = field(default_factory=list)  # "<folder>/<file>" of other extensions


def _visible(name: str) -> bool:
    # hidden entries (.DS_Store, .ipynb_checkpoints) are tool litter, not data
    return not name.startswith(".")


def _entries(uri: str) -> list[tuple[str, bool]]:
    """(name, is a folder) of everything directly under ``uri``, sorted, in one listing (on S3 one
    LIST per 1,000 names, not a HEAD per file)."""
    loc = storage.resolve(uri)
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
    except OSError as e:
        raise storage.StorageError(f"cannot list {uri!r}: {e}") from e
    return sorted((posixpath.basename(i.path.rstrip("/")), i.type == pafs.FileType.Directory) for i in infos)


def class_folders(src_dir: str) -> list[str]:
    """Names of the visible subfolders of ``src_dir``, sorted; there must be at least one."""
    if not storage.is_dir(src_dir):
        raise DataError(f"image folder {src_dir} does not exist or is not a directory")
    folders = [n for n, is_dir in _entries(src_dir) if _visible(n) and is_dir]
    if not folders:
        raise DataError(f"image folder {src_dir} has no class subfolders (expected DIR/<classname>/<image>)")
    return folders


def folder_files(folder_uri: str) -> tuple[list[str], list[str]]:
    """(image file names, other file names) directly in one class folder, each sorted."""
    files = [n for n, is_dir in _entries(folder_uri) if _visible(n) and not is_dir]
    images = [n for n in files if n.lower().endswith(IMAGE_SUFFIXES)]
    return images, [n for n in files if not n.lower().endswith(IMAGE_SUFFIXES)]


def list_labelled_files(src_dir: str, class_names: list[str], folder_classes: dict[str, str] | None = None,
                        only_listed: bool = False) -> Listing:
    """Every image under ``src_dir`` with its label (index in ``class_names``), the folders
    skipped and the files that are not images; checks the layout. A folder's class is its name,
    or its entry in ``folder_classes``; a folder of no known class is an error, or skipped with
    ``only_listed``."""
    folders = class_folders(src_dir)
    index = {c: i for i, c in enumerate(class_names)}
    listing = Listing([], [])
    for folder in folders:
        folder_uri = storage.join(src_dir, folder)
        cls = folder if folder_classes is None else folder_classes.get(folder)
        if cls not in index:
            if only_listed:
                listing.skipped_folders.append(folder)
                continue
            raise DataError(f"class folder {folder_uri} is not one of the given "
                            f"{'folders' if folder_classes is not None else 'class names'}")
        images, others = folder_files(folder_uri)
        if not images:
            raise DataError(f"class folder {folder_uri} has no images ({'/'.join(IMAGE_SUFFIXES)})")
        listing.files += [LabelledFile(storage.join(folder_uri, n), index[cls], f"{folder}/{n}") for n in images]
        listing.not_images += [f"{folder}/{n}" for n in others]
    if not listing.files:
        raise DataError(f"image folder {src_dir} has no folder of the given classes")
    return listing


def read_class_list(uri: str) -> tuple[list[str], dict[str, str] | None]:
    """A class list file: one class name per line (label order), or ``FOLDER<TAB>CLASS`` lines
    (labels in the order classes first appear). Returns (class_names, folder_classes or None)."""
    try:
        text = storage.read_bytes(uri).decode("utf-8")
    except storage.StorageError as e:
        raise DataError(f"class list: {e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"class list {uri} is not UTF-8 text: {e}") from None
    lines = [(n, line.strip("\r")) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    tabbed = {"\t" in line for _, line in lines}
    if len(tabbed) > 1:
        raise DataError(f"class list {uri}: mixes 'CLASS' and 'FOLDER<TAB>CLASS' lines")
    if tabbed != {True}:
        return [line.strip() for _, line in lines], None
    folders: dict[str, str] = {}
    for n, line in lines:
        parts = [p.strip() for p in line.split("\t")]
        if len(parts) != 2 or not all(parts):
            raise DataError(f"class list {uri} line {n}: expected 'FOLDER<TAB>CLASS', got {line!r}")
        if parts[0] in folders:
            raise DataError(f"class list {uri} line {n}: folder {parts[0]!r} is listed twice")
        folders[parts[0]] = parts[1]
    return list(dict.fromkeys(folders.values())), folders


# ---- a held-out split given by index -------------------------------------------------------

def read_holdout_indices(uri: str, n_files: int) -> list[int]:
    """The held-out rows a file names, ascending: a 0/1 (or bool) mask over every image in
    listing order (class folders sorted, files sorted in each: torchvision ImageFolder's order,
    as model soups' ``imagenet_98_idxs.npy``), or a list of row indices. ``.npy`` files are read
    without pickle; any other file holds one integer per line."""
    import io

    import numpy as np

    where = f"holdout indices {uri}"
    try:
        data = storage.read_bytes(uri)
    except storage.StorageError as e:
        raise DataError(f"{where}: {e}") from None
    try:
        if uri.lower().endswith(".npy"):
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        else:
            arr = np.array([int(line) for line in data.decode("utf-8").split() if line.strip()], dtype=np.int64)
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise DataError(f"{where}: not a .npy array nor one integer per line ({e})") from None
    if arr.ndim != 1 or not (arr.dtype == bool or np.issubdtype(arr.dtype, np.integer)
                             or (np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)))):
        raise DataError(f"{where}: expected a flat array of integers or a 0/1 mask, got {arr.dtype} {arr.shape}")
    arr = arr.astype(np.int64) if arr.dtype != bool else arr
    # 0s and 1s beyond two entries cannot be distinct indices: a mask
    if arr.dtype == bool or (len(arr) > 2 and set(np.unique(arr).tolist()) <= {0, 1}):
        if len(arr) != n_files:
            raise DataError(f"{where}: a mask of {len(arr):,} entries, but the folder lists {n_files:,} images "
                            "(the mask was made for another copy of the data set)")
        return np.flatnonzero(arr).tolist()
    bad = arr[(arr < 0) | (arr >= n_files)]
    if bad.size:
        raise DataError(f"{where}: index {int(bad[0])} is outside the folder's {n_files:,} images")
    if len(np.unique(arr)) != len(arr):
        raise DataError(f"{where}: an index is listed twice")
    return sorted(arr.tolist())


# ---- the import: one pass, shard by shard --------------------------------------------------

@dataclass(frozen=True)
class ShardJob:
    """One shard to write: which files, in which order, where; all fixed before any is read."""
    uri: str          # the split's URI
    index: int        # part number
    files: tuple[LabelledFile, ...]
    name: str
    role: str
    class_names: tuple[str, ...]
    skip_bad: bool
    shortest_side: int | None = None


def shrink(data: bytes, image, shortest_side: int) -> bytes:
    """An image whose shorter side exceeds ``shortest_side``, scaled down to it (aspect kept,
    bicubic) and encoded again: JPEG (quality 95) if it was a JPEG, else PNG. Same input, same
    bytes (for one Pillow version)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as src:
        fmt = src.format
    w, h = image.size
    scale = shortest_side / min(w, h)
    small = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    sink = io.BytesIO()
    if fmt == "JPEG":
        small.save(sink, format="JPEG", quality=95)
    else:
        small.save(sink, format="PNG")
    return sink.getvalue()


def import_shard(job: ShardJob) -> dict:
    """Read and decode each file of the shard once and write the shard: the files' original
    bytes, or with ``job.shortest_side`` the larger images scaled down (``shrink``). Returns
    ``{"entry": dataset.json entry or None, "bad": [{"file", "error"}], "images": files
    handled}``. A file that does not decode is skipped with ``skip_bad``; otherwise the shard is
    not written and the first such file is returned as bad."""
    images, labels, bad = [], [], []
    for f in job.files:
        data = storage.read_bytes(f.uri)
        try:
            image = decode_image(data, source=f.uri)
            if job.shortest_side is not None and min(image.size) > job.shortest_side:
                data = shrink(data, image, job.shortest_side)
        except DataError as e:
            bad.append({"file": f.rel, "error": str(e)})
            if not job.skip_bad:
                return {"entry": None, "bad": bad, "images": len(job.files)}
            continue
        images.append(data)
        labels.append(f.label)
    entry = None
    if images:
        entry = write_shard(job.uri, job.index, images, labels, name=job.name, role=job.role,
                            class_names=list(job.class_names))
    return {"entry": entry, "bad": bad, "images": len(job.files)}


def shard_jobs(uri: str, files: list[LabelledFile], rows_per_shard: int, **common) -> list[ShardJob]:
    return [ShardJob(uri, i, tuple(files[start:start + rows_per_shard]), **common)
            for i, start in enumerate(range(0, len(files), rows_per_shard))]


def _task_error(e: BaseException) -> BaseException:
    """The user's error inside a failed Ray task (one line naming the culprit), else ``e``."""
    from ..errors import UserError

    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, UserError) else e


def _run_in_process(jobs: list[ShardJob], on_result: Callable[[int, dict], bool]) -> None:
    for i, job in enumerate(jobs):
        if not on_result(i, import_shard(job)):
            return


def _cpus(here_only: bool) -> int:
    """CPUs of the cluster, or of this node only."""
    import ray

    if not here_only:
        return int(ray.cluster_resources().get("CPU", 1))
    me = ray.get_runtime_context().get_node_id()
    return int(next((n["Resources"].get("CPU", 1) for n in ray.nodes() if n["NodeID"] == me), 1))


def _run_on_ray(jobs: list[ShardJob], on_result: Callable[[int, dict], bool], pin_here: bool) -> None:
    """Each job a Ray task, a bounded number in flight (a shard's bytes sit in a task's memory,
    never in the driver's). ``on_result`` returning False stops new submissions; the tasks in
    flight are waited for, so nothing writes after this returns. ``pin_here``: run on this node
    (local paths are this machine's)."""
    import ray

    options: dict = {"num_cpus": 1, "max_retries": 0}
    if pin_here:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                         soft=False)
    task = ray.remote(import_shard).options(**options)
    in_flight_max = max(2, 2 * _cpus(here_only=pin_here))
    pending: dict = {}
    next_job, go_on = 0, True
    try:
        while pending or (go_on and next_job < len(jobs)):
            while go_on and next_job < len(jobs) and len(pending) < in_flight_max:
                pending[task.remote(jobs[next_job])] = next_job
                next_job += 1
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:
                    raise _task_error(e) from None
                go_on = on_result(i, result) and go_on
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        if pending:  # cancelled tasks end before the caller removes what they wrote
            ray.wait(list(pending), num_returns=len(pending), timeout=30)
        raise


def import_image_folder(src_dir: str, out_uri: str, *, name: str | None = None, role: str = "ood",
                        class_names: list[str] | None = None, folder_classes: dict[str, str] | None = None,
                        only_listed: bool = False, shuffle_seed: int | None = None,
                        holdout: float = 0.0, holdout_uri: str | None = None,
                        holdout_indices: str | None = None, rows_per_shard: int = 512, skip_bad: bool = False, shortest_side: int | None = None,
                        parallel: bool | None = None, progress: Progress | None = None) -> dict:
    """Turn ``src_dir/<folder>/<image>`` into a shard set at ``out_uri``; returns its
    dataset.json plus ``skipped_folders`` and ``holdout_rows``. A folder's class is its name, or
    its entry in ``folder_classes`` (e.g. ImageNet-V2's ``0`` .. ``999`` -> WordNet ids). Labels
    follow ``class_names`` (default: the sorted classes found), so sets with the same class list
    get the same labels; with ``class_names`` given, a subset of the classes may be present. With
    ``only_listed``, folders of no given class are skipped instead of refused. Rows are written
    folder by folder, or in an order shuffled by ``shuffle_seed``: what a train set streamed
    shard by shard needs (docs/finetune.md). ``holdout``: this fraction of the images, drawn
    with ``shuffle_seed`` (or 0), goes to a ``val`` split at ``holdout_uri`` instead (model
    soups' 2 % of ImageNet train); both splits are written, or neither. ``holdout_indices``: a
    file naming the held-out images by their index in listing order instead (model soups'
    ``imagenet_98_idxs.npy``, see ``read_holdout_indices``), taken as the reference takes them.
    dataset.json records the row order (``order``: ``shuffled`` with its seed, or ``folders``)
    and how a held-out val was drawn (``holdout``).

    A file that does not decode is refused, naming the first (in row order), and nothing is
    left at either URI; with ``skip_bad`` it is left out and listed in dataset.json's
    ``bad_files``. Files of other extensions are listed in ``not_images``. ``shortest_side``:
    images whose shorter side is longer are scaled down to it and encoded again (dataset.json
    says so); by default every image is stored as its original bytes. ``parallel``: Ray
    tasks (default: when Ray is initialised) or in this process; the bytes written are the same.
    ``progress(done, total)`` is called as shards finish."""
    check_role(role, f"import {src_dir}")
    if holdout_indices is not None and holdout > 0:
        raise DataError(f"import {src_dir}: give a holdout fraction or a holdout indices file, not both")
    if holdout_indices is not None and holdout_uri is None:
        raise DataError(f"import {src_dir}: holdout indices {holdout_indices} need a holdout URI")
    if holdout_indices is None and (not 0.0 <= holdout < 1.0 or (holdout > 0) != (holdout_uri is not None)):
        raise DataError(f"import {src_dir}: holdout must lie in [0, 1) and come with a holdout URI "
                        f"(got {holdout} and {holdout_uri!r})")
    if holdout_uri is not None and storage.resolve(holdout_uri).uri == storage.resolve(out_uri).uri:
        raise DataError(f"import {src_dir}: the holdout URI must differ from the output URI ({out_uri})")
    if not isinstance(rows_per_shard, int) or rows_per_shard <= 0:
        raise DataError(f"import {src_dir}: rows_per_shard must be a positive integer, got {rows_per_shard!r}")
    if shortest_side is not None and (not isinstance(shortest_side, int) or shortest_side <= 0):
        raise DataError(f"import {src_dir}: shortest_side must be a positive integer, got {shortest_side!r}")
    if class_names is None:
        if folder_classes is not None:
            class_names = sorted(set(folder_classes.values()))
        else:
            class_names = class_folders(src_dir)
    class_names = check_class_names(class_names, f"import {src_dir}")
    listing = list_labelled_files(src_dir, class_names, folder_classes, only_listed)
    files = listing.files
    held: list[LabelledFile] = []
    how_held: dict = {}
    if holdout_indices is not None:
        # the reference's indices count images in listing order, before any shuffle
        picked_rows = read_holdout_indices(holdout_indices, len(files))
        if not picked_rows or len(picked_rows) == len(files):
            raise DataError(f"import {src_dir}: holdout indices {holdout_indices} leave a split empty")
        picked = set(picked_rows)
        held = [files[i] for i in picked_rows]
        files = [f for i, f in enumerate(files) if i not in picked]
        how_held = {"method": "indices", "file": posixpath.basename(holdout_indices),
                    "sha256": storage.sha256(storage.read_bytes(holdout_indices)), "rows": len(held)}
    if shuffle_seed is not None:
        order = random.Random(shuffle_seed).sample(range(len(files)), len(files))
        files = [files[i] for i in order]
    name = name or posixpath.basename(src_dir.rstrip("/").rstrip("\\")) or "images"
    if holdout > 0:
        picked = set(random.Random(shuffle_seed or 0).sample(range(len(files)), round(holdout * len(files))))
        if not picked or len(picked) == len(files):
            raise DataError(f"import {src_dir}: a holdout of {holdout} of {len(files)} images leaves a split empty")
        held = [f for i, f in enumerate(files) if i in picked]
        files = [f for i, f in enumerate(files) if i not in picked]
        how_held = {"method": "random", "fraction": holdout, "seed": shuffle_seed or 0, "rows": len(held)}

    common = {"class_names": tuple(class_names), "skip_bad": skip_bad, "shortest_side": shortest_side}
    splits = {out_uri: (name, role)}
    jobs = shard_jobs(out_uri, files, rows_per_shard, name=name, role=role, **common)
    if held:
        splits[holdout_uri] = (f"{name}-holdout", "val")
        jobs += shard_jobs(holdout_uri, held, rows_per_shard, name=f"{name}-holdout", role="val", **common)
    total = len(files) + len(held)
    results: dict[int, dict] = {}
    done = 0

    def on_result(i: int, result: dict) -> bool:
        nonlocal done
        results[i] = result
        done += result["images"]
        if progress is not None:
            progress(done, total)
        return result["entry"] is not None or skip_bad or not result["bad"]

    existed: dict[str, bool] = {}
    try:
        for uri in splits:
            existed[uri] = clear_split(uri)
        if parallel is None:
            parallel = _ray_initialized()
        if parallel:
            pin = not all(storage.is_remote(u) for u in (src_dir, *splits))
            _run_on_ray(jobs, on_result, pin_here=pin)
        else:
            _run_in_process(jobs, on_result)
        failed = [r["bad"][0] for i, r in sorted(results.items()) if r["entry"] is None and r["bad"] and not skip_bad]
        if failed:
            raise DataError(f"{failed[0]['error']} (--skip-bad leaves such files out)")
        infos = {}
        for uri, (split_name, split_role) in splits.items():
            mine = [results[i] for i, job in enumerate(jobs) if job.uri == uri]
            entries = [r["entry"] for r in mine if r["entry"] is not None]
            if not entries:
                raise DataError(f"import {src_dir}: no image for {uri} decodes")
            extra = {"bad_files": [b for r in mine for b in r["bad"]],
                     # how the rows were ordered: a train split streamed shard by shard must be shuffled
                     "order": "folders"}
            if shuffle_seed is not None and not (uri != out_uri and how_held.get("method") == "indices"):
                extra.update(order="shuffled", shuffle_seed=shuffle_seed)  # the indices' rows keep listing order
            if uri != out_uri:
                extra["holdout"] = {"of": name, **how_held}
            if shortest_side is not None:
                extra["shortest_side"] = shortest_side  # larger images were scaled down and re-encoded
            if uri == out_uri:
                extra["not_images"] = listing.not_images
            infos[uri] = finish_split(uri, entries, name=split_name, role=split_role, class_names=class_names,
                                      extra=extra)
    except BaseException:
        for uri, was in existed.items():
            undo_split(uri, was)
        raise
    info = infos[out_uri]
    bad = info["bad_files"] + (infos[holdout_uri]["bad_files"] if held else [])
    return {**info, "skipped_folders": listing.skipped_folders, "skipped_bad": bad,
            "holdout_rows": infos[holdout_uri]["num_rows"] if held else 0}


def _ray_initialized() -> bool:
    if "ray" not in sys.modules:  # this library never starts Ray itself, nor imports it for nothing
        return False
    import ray

    return ray.is_initialized()


class ProgressLine:
    """``progress(done, total)`` as images/s on a stream: one line rewritten in place on a
    terminal, a new line at most every ``every_s`` seconds otherwise (logs, `ray job` output)."""

    def __init__(self, what: str = "import", stream=None, every_s: float = 5.0):
        self.what, self.stream, self.every_s = what, stream or sys.stderr, every_s
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self._last = -float("inf")

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done < total and now - self._last < (0.5 if self.tty else self.every_s):
            return
        self._last = now
        rate = done / max(now - self.t0, 1e-9)
        text = f"{self.what}: {done:,} / {total:,} images ({rate:,.0f} images/s)"
        if self.tty:
            self.stream.write("\r" + text + ("\n" if done >= total else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
