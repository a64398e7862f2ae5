"""Retraining: what is new in the data since the champion, the frozen evaluation set, candidates.

The pieces ``flows/retrain_flow.py`` (``retrain-cnc``) composes; each is callable without Prefect.
"""

from tasks.retraining.candidate import candidate_id, find_registered
from tasks.retraining.data_state import DataState, data_state, resolve_triplets
from tasks.retraining.eval_set import FrozenEvalSet, flatten_metrics

__all__ = ["DataState", "FrozenEvalSet", "candidate_id", "data_state", "find_registered", "flatten_metrics",
           "resolve_triplets"]
