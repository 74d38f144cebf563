"""Soup methods, one module each, registered in the order the report lists them (see base.py)."""
from .base import (REGISTRY, MethodContext, MethodError, MethodResult, SearchResult, SoupMethod, methods,
                   register, run_methods, unregister)
from . import baselines, mmms  # noqa: E402,F401  registers best_individual .. mmms, in this order

__all__ = ["REGISTRY", "MethodContext", "MethodError", "MethodResult", "SearchResult", "SoupMethod", "methods",
           "register", "run_methods", "unregister"]
