"""Predict which experts come next and load them early: predictors, the prefetcher, routing traces."""

from .predictors import (
    CorrelationPredictor,
    GateLookahead,
    HistoryPredictor,
    Predictor,
    list_predictors,
    load_correlation_tables,
    make_predictor,
    register_predictor,
)
from .prefetcher import Prefetcher
from .trace import RoutingTrace, map_routing

__all__ = [
    "CorrelationPredictor",
    "GateLookahead",
    "HistoryPredictor",
    "Predictor",
    "list_predictors",
    "load_correlation_tables",
    "make_predictor",
    "register_predictor",
    "Prefetcher",
    "RoutingTrace",
    "map_routing",
]
