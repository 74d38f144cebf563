"""Soup methods, one module each, registered in the order the report lists them (see base.py)."""
from .base import (REGISTRY, MethodContext, MethodError, MethodResult, SearchResult, SoupMethod, methods,
                   register, run_methods, unregister)
from . import baselines, wise_ft, output_ensemble, mmms  # noqa: E402,F401  registered in this order

__all__ = ["REGISTRY", "MethodContext", "MethodError", "MethodResult", "SearchResult", "SoupMethod", "methods",
           "register", "run_methods", "unregister"]
