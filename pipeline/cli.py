"""The `frankensoup` command line: one subcommand per stage, plus `run` for all of them."""
from __future__ import annotations

import argparse
import sys

from . import console
from .config import ROLES
from .stages import STAGES, runner


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config (default: configs/demo.yaml, else built-in demo); "
                                          "a name like imagenet-vit-b32 picks an example config shipped with frankensoup")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set soup.num_workers=8 (repeatable)")


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("frankensoup")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown (not installed)"


def _verbosity_args(p: argparse.ArgumentParser, default) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="also show Ray's INFO logs and Ray Data's progress bars")
    g.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="show only errors and the final table")


def _no_wait_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-wait", action="store_true",
                   help="stop at once if another command is writing to output_uri (default: wait for it)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="frankensoup", description=__doc__)
    parser.add_argument("--version", action="version", version=f"frankensoup {version()}")
    _verbosity_args(parser, False)
    # -v / -q also after the subcommand (`frankensoup run -q`); SUPPRESS keeps the main parser's
    common = argparse.ArgumentParser(add_help=False)
    _verbosity_args(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    p = add("run", help="prepare -> finetune -> evaluate -> soup, reusing all work whose inputs are unchanged")
    _add_config_args(p)
    p.add_argument("--dry-run", action="store_true", help="check config, storage and cluster; print the plan")
    p.add_argument("--force", action="store_true", help="redo all work even where its inputs are unchanged")
    _no_wait_arg(p)

    for name, stage in STAGES.items():
        p = add(name, help=stage.help)
        _add_config_args(p)
        p.add_argument("--force", action="store_true", help="redo the stage even if finished")
        _no_wait_arg(p)

    p = add("import-images", help="turn DIR/<class folder>/<image> into shards")
    p.add_argument("src", metavar="DIR")
    p.add_argument("--out", required=True, metavar="URI")
    p.add_argument("--name")
    p.add_argument("--role", default="ood", choices=ROLES)
    p.add_argument("--classes", metavar="FILE",
                   help="class names in label order, one per line, or 'FOLDER<TAB>CLASS' lines when folder "
                        "names are not class names (default: the sorted folder names)")
    p.add_argument("--shuffle-seed", type=int, metavar="N",
                   help="write the rows in an order shuffled with seed N (do this for train sets: "
                        "finetuning streams large ones shard by shard)")
    p.add_argument("--holdout", type=float, default=0.0, metavar="FRACTION",
                   help="send this fraction of the images (drawn with --shuffle-seed) to a val split at "
                        "--holdout-out; a random draw: not the images model soups held out (--holdout-indices)")
    p.add_argument("--holdout-indices", metavar="FILE",
                   help="send the images this file names to a val split at --holdout-out: a 0/1 mask over "
                        "every image in folder order or a list of indices (.npy, or one per line), e.g. model "
                        "soups' imagenet_98_idxs.npy, their held-out 2 %% of ImageNet train")
    p.add_argument("--holdout-out", metavar="URI")
    p.add_argument("--objectnet-mappings", metavar="DIR",
                   help="ObjectNet's mappings/ folder: import only the folders it maps to ImageNet classes")
    p.add_argument("--rows-per-shard", type=int, default=512)
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out files that do not decode (listed in dataset.json's bad_files) "
                        "instead of refusing the import")
    p.add_argument("--shortest-side", type=int, metavar="PIXELS",
                   help="scale images whose shorter side is longer down to PIXELS and encode them again "
                        "(JPEG q95 / PNG); default: store every image as its original bytes")
    p.add_argument("--serial", action="store_true", help="import in this process, without Ray")

    p = add("import-ingredients", help="register existing finetuned checkpoints as ingredients")
    _add_config_args(p)
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--layout", choices=["auto", "frankensoup", "model-soups"], default="auto")
    p.add_argument("--replace", action="store_true",
                   help="drop every registered ingredient first (default: add to the registry)")
    _no_wait_arg(p)

    p = add("config", help="show, validate or describe a config (never starts Ray)")
    p.add_argument("action", choices=["show", "validate", "schema"],
                   help="show: the resolved config as YAML (after --set, credentials in URIs hidden); "
                        "validate: one line per problem; schema: the JSON schema of every field")
    _add_config_args(p)

    add("where", help="print where the files shipped with frankensoup are: the Grafana dashboard, "
                      "the cluster launcher YAML, the example configs")

    p = add("predict", help="classify images with a published fused model")
    p.add_argument("uri", metavar="URI", help="output_uri, a soup/<run-id> or its fused/ directory")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--top", type=int, default=1)
    return parser


def _say(args):
    """print, or nothing with -q."""
    return (lambda *_: None) if args.quiet else print


def _import_images(args) -> int:
    from .data.images import ProgressLine, import_image_folder
    from .errors import UserError

    classes, folders, only_listed = None, None, False
    if args.classes and args.objectnet_mappings:
        raise UserError("--classes and --objectnet-mappings: give one")
    if args.classes:
        from .data.images import read_class_list

        classes, folders = read_class_list(args.classes)
    if args.objectnet_mappings:
        from .data.imagenet import objectnet_class_map

        classes, only_listed = list(objectnet_class_map(args.objectnet_mappings)), True
    if not args.serial:
        from .raycluster import connect

        connect()
    from . import storage

    storage.check_reachable([args.out, args.holdout_out])
    info = import_image_folder(args.src, args.out, name=args.name, role=args.role, class_names=classes,
                               folder_classes=folders, only_listed=only_listed, shuffle_seed=args.shuffle_seed,
                               holdout=args.holdout, holdout_uri=args.holdout_out,
                               holdout_indices=args.holdout_indices,
                               rows_per_shard=args.rows_per_shard, skip_bad=args.skip_bad,
                               shortest_side=args.shortest_side,
                               parallel=not args.serial, progress=None if args.quiet else ProgressLine())
    say = _say(args)
    skipped = f", {len(info['skipped_folders'])} folders of other classes skipped" if only_listed else ""
    say(f"wrote {info['num_rows']} images, {len(info['class_names'])} classes, "
        f"role {info['role']} -> {args.out}{skipped}")
    if info["holdout_rows"]:
        say(f"wrote {info['holdout_rows']} held-out images, role val -> {args.holdout_out}")
    for what, files in (("files that do not decode, skipped", [b["file"] for b in info["skipped_bad"]]),
                        ("files that are not images (by extension), ignored", info["not_images"])):
        if files:
            shown = ", ".join(files[:5]) + (f", ... ({len(files) - 5} more)" if len(files) > 5 else "")
            print(f"{len(files)} {what}: {shown} (all listed in dataset.json)", file=sys.stderr)
    return 0


def shipped_files() -> dict[str, str]:
    """What ships inside the package next to the code, by what it is -> its path here."""
    from pathlib import Path

    root = Path(__file__).parent
    return {"grafana dashboard": str(root / "dashboards" / "frankensoup.json"),
            "ray cluster launcher": str(root / "ray_cluster.yaml"),
            "example configs": str(root / "configs")}


def _where() -> int:
    files = shipped_files()
    width = max(map(len, files))
    for what, path in files.items():
        print(f"{what + ':':<{width + 1}} {path}")
    print("Grafana with Ray's provisioning loads the dashboard from the head's "
          f"/tmp/ray/session_latest/metrics/grafana/dashboards/:\n  cp {files['grafana dashboard']} "
          "/tmp/ray/session_latest/metrics/grafana/dashboards/")
    return 0


def shipped_config(name: str) -> str | None:
    """The example config ``name`` (``imagenet-vit-b32`` or ``imagenet-vit-b32.yaml``) shipped in
    the package (pipeline/configs), or None."""
    from pathlib import Path

    folder = Path(__file__).parent / "configs"
    for candidate in (name, f"{name}.yaml"):
        path = folder / candidate
        if "/" not in name and path.is_file():
            return str(path)
    return None


def _config(args):
    import os

    from .config import load_config

    path = args.config
    if path is not None and not os.path.exists(path):
        path = shipped_config(path) or path  # a missing file stays the error it is
    return load_config(path, args.overrides)


def _dispatch(args) -> int:

    cmd = args.command
    if cmd == "import-images":
        return _import_images(args)
    if cmd == "where":
        return _where()
    if cmd == "config":
        return _config_command(args)
    if cmd == "predict":
        from .fused import predict_files

        for path, preds in predict_files(args.uri, args.images, top=args.top):
            print(path + "\t" + "\t".join(f"{name} {p:.3f}" for name, p in preds))
        return 0

    from .metrics import new_run

    new_run()  # this command's id: the `run` label of its dashboard metrics, run.json's "run"
    cfg = _config(args)
    from . import layout, storage

    storage.check_reachable(layout.storage_uris(cfg))  # seconds, not minutes of retries, when it is down
    from .raycluster import check_reachable as check_ray_reachable

    check_ray_reachable(cfg.ray.address)  # before the lease: a head nobody answers for leaves nothing behind
    log = _say(args)
    if cmd == "run" and args.dry_run:
        from .dryrun import dry_run

        return 0 if dry_run(cfg) else 1
    from .lease import holding

    # one writer per output: a second command waits for this one (or stops with --no-wait)
    with holding(cfg.output_uri, cmd, ttl_s=cfg.storage.lease_ttl_s, wait=not args.no_wait, log=log):
        return _run_command(cmd, cfg, args, log)


def _run_command(cmd: str, cfg, args, log) -> int:
    if cmd in (*STAGES, "import-ingredients") and cmd != "prepare":
        from .prepare import check_splits_unchanged

        check_splits_unchanged(cfg)  # `run` and `prepare` check in prepare, after remaking demo shards
    if cmd == "import-ingredients":
        from .finetune.import_ingredients import import_ingredients

        import_ingredients(cfg, args.files, layout=args.layout, replace=args.replace)
    elif cmd == "soup":
        _final_table(args, runner("soup")(cfg, force=args.force, log=log, show_table=False))
    elif cmd in STAGES:
        runner(cmd)(cfg, force=args.force, log=log)
    elif cmd == "run":
        from .run import run_all

        _final_table(args, run_all(cfg, force=args.force, log=log, show_table=False))
    return 0


def _show_list(dumper, items: list):
    """Lists of plain values on one line (shifts: [noise, blur]), the rest as blocks."""
    flat = all(not isinstance(v, (dict, list)) for v in items)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", items, flow_style=flat)


def _config_command(args) -> int:
    """`frankensoup config show | validate | schema`: reads the config only, starts nothing."""
    import json

    import yaml

    from .config import Config, ConfigError, redacted

    if args.action == "schema":
        from . import methodspec

        print(json.dumps(methodspec.json_schema(Config.model_json_schema()), indent=2))
        return 0
    try:
        cfg = _config(args)
    except ConfigError as e:
        if args.action != "validate":
            raise
        for line in e.problems:
            print(line)
        return 1
    if args.action == "show":
        class Dumper(yaml.SafeDumper):
            pass

        Dumper.add_representer(list, _show_list)
        print(yaml.dump(redacted(cfg), Dumper=Dumper, sort_keys=False, width=100), end="")
    else:
        print(f"ok: {args.config or 'the default config'}")
    return 0


def _final_table(args, report: dict) -> None:
    """The report's table, last: on a terminal as tables that fit its width (rich); with -q,
    or into a pipe or a file, the markdown table of report.md (what logs have always got)."""
    if args.quiet or not console.isatty(sys.stdout):
        from .report.results import markdown_table

        print(markdown_table(report))
    else:
        from .report.terminal import print_table

        print_table(report)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import UserError

    console.configure(console.QUIET if args.quiet else console.VERBOSE if args.verbose else console.NORMAL)

    try:
        return _dispatch(args)
    except UserError as e:
        # bad input: one clear line naming the culprit, no traceback
        print(f"frankensoup: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("frankensoup: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
