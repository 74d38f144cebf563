"""The soup: mixture maths, the model-soups baselines and the MMMS phases (all Ray-free, driven
by an ``evaluate(list of beta) -> list of val accuracy`` callable), and the search memo."""
from .baselines import best_individual, greedy_soup, uniform_soup
from .memo import Memo, MemoEvaluator
from ..mixture import MixtureError, mixture_key
from .mmms import Phase1Result, Phase2Result, minimise, phase1, phase2

__all__ = ["best_individual", "greedy_soup", "uniform_soup", "Memo", "MemoEvaluator",
           "MixtureError", "mixture_key", "Phase1Result", "Phase2Result", "minimise", "phase1", "phase2"]
