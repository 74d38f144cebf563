"""Soup methods, one module each, registered in the order the report lists them (see base.py)."""
from ...methodspec import MethodSettings
from .base import (REGISTRY, MethodContext, MethodError, MethodResult, SearchResult, SoupMethod, enabled_methods,
                   method_keys, methods, register, run_methods, unregister)
from . import baselines, wise_ft, model_stock, lines, output_ensemble, mmms  # noqa: E402,F401  in this order

__all__ = ["REGISTRY", "MethodContext", "MethodError", "MethodResult", "MethodSettings", "SearchResult", "SoupMethod",
           "enabled_methods", "method_keys", "methods", "register", "run_methods", "unregister"]
