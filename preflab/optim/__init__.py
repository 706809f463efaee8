"""Optimizers beyond AdamW: the online merging optimizers (OnDARE, OnTIES)."""

from .merging import MergingOptions, OnDAREAdamW, OnTIESAdamW, task_vectors_by_name, ties_merge, topk_mask

__all__ = ["MergingOptions", "OnDAREAdamW", "OnTIESAdamW", "task_vectors_by_name", "ties_merge", "topk_mask"]
