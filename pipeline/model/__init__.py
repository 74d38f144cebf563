"""Model library: open_clip factory use, the classifier, checkpoints, components, demo
pretraining. Importing it registers the demo architecture with open_clip."""
from .checkpoint import CheckpointError, read_checkpoint
from .factory import (DEMO_MODEL, create_clip, image_transform, load_clip, model_config,
                      preprocess_of, save_clip, tokenizer_for)
from .classifier import (TEMPLATES, Classifier, build_classifier, classifier_from_state,
                         init_classifier, resolve_templates)
from .weights import load_classifier, save_classifier
from .components import LEVEL_NAMES, Component, components

__all__ = [
    "CheckpointError", "load_classifier", "read_checkpoint", "save_classifier",
    "DEMO_MODEL", "create_clip", "image_transform", "load_clip", "model_config",
    "preprocess_of", "save_clip", "tokenizer_for",
    "TEMPLATES", "Classifier", "build_classifier", "classifier_from_state",
    "init_classifier", "resolve_templates",
    "LEVEL_NAMES", "Component", "components",
]
