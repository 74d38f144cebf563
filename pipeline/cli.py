"""The `frankensoup` command line: one subcommand per stage, plus `run` for all of them."""
from __future__ import annotations

import argparse
import sys


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config (default: configs/demo.yaml, else built-in demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set soup.num_workers=8 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="frankensoup", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="prepare -> finetune -> evaluate -> soup, reusing all work whose inputs are unchanged")
    _add_config_args(p)
    p.add_argument("--dry-run", action="store_true", help="check config, storage and cluster; print the plan")
    p.add_argument("--force", action="store_true", help="redo all work even where its inputs are unchanged")

    for name, text in [("prepare", "build the demo shards and the demo base model"),
                       ("finetune", "run the Ray Tune sweep and write the ingredient registry"),
                       ("evaluate", "score every ingredient on val, id_test and ood sets (Ray Data)"),
                       ("soup", "baselines + manifold mixing soup; publish the fused model")]:
        p = sub.add_parser(name, help=text)
        _add_config_args(p)
        p.add_argument("--force", action="store_true", help="redo the stage even if finished")

    p = sub.add_parser("import-images", help="turn DIR/<class folder>/<image> into shards")
    p.add_argument("src", metavar="DIR")
    p.add_argument("--out", required=True, metavar="URI")
    p.add_argument("--name")
    p.add_argument("--role", default="ood", choices=["pretrain", "train", "val", "id_test", "ood"])
    p.add_argument("--classes", metavar="FILE",
                   help="class names in label order, one per line, or 'FOLDER<TAB>CLASS' lines when folder "
                        "names are not class names (default: the sorted folder names)")
    p.add_argument("--shuffle-seed", type=int, metavar="N",
                   help="write the rows in an order shuffled with seed N (do this for train sets: "
                        "finetuning streams large ones shard by shard)")
    p.add_argument("--holdout", type=float, default=0.0, metavar="FRACTION",
                   help="send this fraction of the images (drawn with --shuffle-seed) to a val split at "
                        "--holdout-out, e.g. model soups' 0.02 of ImageNet train")
    p.add_argument("--holdout-out", metavar="URI")
    p.add_argument("--objectnet-mappings", metavar="DIR",
                   help="ObjectNet's mappings/ folder: import only the folders it maps to ImageNet classes")
    p.add_argument("--rows-per-shard", type=int, default=512)

    p = sub.add_parser("import-ingredients", help="register existing finetuned checkpoints as ingredients")
    _add_config_args(p)
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--layout", choices=["auto", "frankensoup", "model-soups"], default="auto")
    p.add_argument("--replace", action="store_true",
                   help="drop every registered ingredient first (default: add to the registry)")

    p = sub.add_parser("predict", help="classify images with a published fused model")
    p.add_argument("uri", metavar="URI", help="output_uri, a soup/<run-id> or its fused/ directory")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--top", type=int, default=1)
    return parser


def _config(args):
    from .config import load_config

    return load_config(args.config, args.overrides)


def _dispatch(args) -> int:
    from .errors import UserError

    cmd = args.command
    if cmd == "import-images":
        from .data.images import import_image_folder

        classes, folders, only_listed = None, None, False
        if args.classes and args.objectnet_mappings:
            raise UserError("--classes and --objectnet-mappings: give one")
        if args.classes:
            from .data.images import read_class_list

            classes, folders = read_class_list(args.classes)
        if args.objectnet_mappings:
            from .data.imagenet import objectnet_class_map

            classes, only_listed = list(objectnet_class_map(args.objectnet_mappings)), True
        info = import_image_folder(args.src, args.out, name=args.name, role=args.role, class_names=classes,
                                   folder_classes=folders, only_listed=only_listed, shuffle_seed=args.shuffle_seed,
                                   holdout=args.holdout, holdout_uri=args.holdout_out,
                                   rows_per_shard=args.rows_per_shard)
        skipped = f", {len(info['skipped_folders'])} folders of other classes skipped" if only_listed else ""
        print(f"wrote {info['num_rows']} images, {len(info['class_names'])} classes, "
              f"role {info['role']} -> {args.out}{skipped}")
        if info["holdout_rows"]:
            print(f"wrote {info['holdout_rows']} held-out images, role val -> {args.holdout_out}")
        return 0
    if cmd == "predict":
        from .fused import predict_files

        for path, preds in predict_files(args.uri, args.images, top=args.top):
            print(path + "\t" + "\t".join(f"{name} {p:.3f}" for name, p in preds))
        return 0

    cfg = _config(args)
    if cmd == "prepare":
        from .prepare import run_prepare

        run_prepare(cfg, force=args.force)
    elif cmd == "finetune":
        from .finetune.sweep import run_finetune

        run_finetune(cfg, force=args.force)
    elif cmd == "import-ingredients":
        from .finetune.registry import import_ingredients

        import_ingredients(cfg, args.files, layout=args.layout, replace=args.replace)
    elif cmd == "evaluate":
        from .evaluate.stage import run_evaluate

        run_evaluate(cfg, force=args.force)
    elif cmd == "soup":
        from .soup.stage import run_soup

        run_soup(cfg, force=args.force)
    elif cmd == "run":
        if args.dry_run:
            from .dryrun import dry_run

            return 0 if dry_run(cfg) else 1
        from .run import run_all

        run_all(cfg, force=args.force)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import UserError

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
