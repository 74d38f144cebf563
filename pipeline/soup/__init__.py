"""The soup stage. Its core — mixture maths (mixing.py), the model-soups baselines
(baselines.py), the MMMS phases (mmms.py), the dispatcher and the search memo — is Ray-free,
driven by any evaluator of the mixture contract (pipeline/mixture.py); the Ray pool of
evaluator actors (pool.py), the soup methods (methods/) and the stage (stage.py) sit on it."""
from .baselines import best_individual, greedy_soup, uniform_soup
from .memo import Memo, MemoEvaluator
from ..mixture import MixtureError, mixture_key
from .mmms import Phase1Result, Phase2Result, minimise, phase1, phase2

__all__ = ["best_individual", "greedy_soup", "uniform_soup", "Memo", "MemoEvaluator",
           "MixtureError", "mixture_key", "Phase1Result", "Phase2Result", "minimise", "phase1", "phase2"]
