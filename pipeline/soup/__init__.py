"""The soup: mixture maths, the model-soups baselines and the MMMS phases (all Ray-free, driven
by an ``evaluate(list of beta) -> list of val accuracy`` callable), and the evaluation journal."""
from .baselines import best_individual, greedy_soup, uniform_soup
from .journal import Journal, JournaledEvaluator
from .mixture import MixtureError, mixture_key
from .mmms import Phase1Result, Phase2Result, minimise, phase1, phase2

__all__ = ["best_individual", "greedy_soup", "uniform_soup", "Journal", "JournaledEvaluator",
           "MixtureError", "mixture_key", "Phase1Result", "Phase2Result", "minimise", "phase1", "phase2"]
