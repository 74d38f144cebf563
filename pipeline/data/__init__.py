"""Image data as shard sets (parquet + dataset.json), local or on s3://: the schema and its IO,
image-folder import, and the offline demo digits with their distribution shifts. Knows nothing
of models or stages; see docs/data.md."""
from .demo import DIGIT_CLASSES, DemoSplit, build_demo_splits, write_demo_splits
from .images import import_image_folder
from .shards import (ROLES, DataError, Split, decode_image, decode_split, encode_png, read_split,
                     shard_uris, split_info, write_split)

__all__ = [
    "DIGIT_CLASSES", "DemoSplit", "build_demo_splits", "write_demo_splits", "import_image_folder",
    "ROLES", "DataError", "Split", "decode_image", "decode_split", "encode_png", "read_split",
    "shard_uris", "split_info", "write_split",
]
