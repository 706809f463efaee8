"""Optimizers by name (``optim.name``): AdamW and the online merging optimizers (OnDARE, OnTIES), each registered
with its own settings (:mod:`preflab.optim.registry`)."""

from . import adamw, online  # noqa: F401  (each module registers its optimizers)
from .merging import MergingOptions, OnDAREAdamW, OnTIESAdamW, task_vectors_by_name, ties_merge, topk_mask
from .registry import OptimizerInputs, build_optimizer, optimizer_registry, register_optimizer

__all__ = ["MergingOptions", "OnDAREAdamW", "OnTIESAdamW", "OptimizerInputs", "build_optimizer", "optimizer_registry",
           "register_optimizer", "task_vectors_by_name", "ties_merge", "topk_mask"]
