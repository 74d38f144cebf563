"""The finetune stage: a Ray Tune sweep of finetuning trials (`sweep.run_finetune`) that writes
the ingredient registry (`pipeline.ingredients`), or imported checkpoints
(`registry.import_ingredients`). `trainable.run_trial` is the plain training loop."""
from ..ingredients import RegistryError, read_registry, usable, write_registry
from .import_ingredients import import_ingredients

__all__ = ["RegistryError", "import_ingredients", "read_registry", "usable", "write_registry",
           "run_finetune"]


def run_finetune(cfg, force: bool = False, log=print) -> dict:
    """See `pipeline.finetune.sweep.run_finetune` (imported lazily: it pulls in Ray)."""
    from .sweep import run_finetune as _run

    return _run(cfg, force=force, log=log)
