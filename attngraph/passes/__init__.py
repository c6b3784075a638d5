"""Graph rewrites: a pass is a list of rules applied to a fixpoint; pipeline.py orders them."""

from .pipeline import PASS_NAMES, PIPELINE, DriftError, optimize, random_feeds
from .rewrite import Event, PassLog, Rewriter, Rule, eliminate_dead_code, rewrite

__all__ = ["PASS_NAMES", "PIPELINE", "DriftError", "optimize", "random_feeds", "Event", "PassLog", "Rewriter",
           "Rule", "eliminate_dead_code", "rewrite"]
