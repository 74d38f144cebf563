"""Soup methods, one module each, registered in the order the report lists them (see base.py)."""
from ...methodspec import MethodSettings
from .base import (SOUP_METHODS, MethodContext, MethodError, MethodResult, SearchResult, SoupMethod, enabled_methods,
                   method_keys, methods, register, run_methods, unregister)
from . import model_soups, wise_ft, model_stock, lines, output_ensemble, manifold_mixing  # noqa: E402,F401  in this order

__all__ = ["SOUP_METHODS", "MethodContext", "MethodError", "MethodResult", "MethodSettings", "SearchResult", "SoupMethod",
           "enabled_methods", "method_keys", "methods", "register", "run_methods", "unregister"]
