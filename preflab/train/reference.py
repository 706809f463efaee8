"""Reference log-probs of a run's training pairs: from the reference cache, the missing ones computed by the
reference (the policy's network with the trained part off, or a frozen copy) and cached.

Where the engine shards the weights the reference forward of the policy's own network is a collective: the engine
says when every process must run it although its own pairs are cached (:meth:`Engine.collective_need`) and how
many forwards each runs when they precompute (:meth:`Engine.common_count`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from ..adapters import Parametrization
from ..console import progress as progress_of
from ..data.collate import PreferenceBatch
from ..data.tokenize import TokenizedPair
from ..models.reference_cache import ReferenceCache, default_cache_dir, model_fingerprint, pair_key
from ..models.scorer import SequenceScorer, eval_mode
from .engine import Engine

log = logging.getLogger(__name__)


class ReferenceLogps:
    """The reference's log-probs of ``pairs`` (indexed like the run's training pairs)."""

    def __init__(self, param: Parametrization, engine: Engine, pairs: list[TokenizedPair], chunk_size: int,
                 collate: Callable[[list[int]], PreferenceBatch], cache: str, cache_dir: str | None,
                 precision: str):
        self.param, self.engine, self.pairs, self.chunk_size, self.collate = param, engine, pairs, chunk_size, collate
        self.keys = [pair_key(p) for p in pairs]
        self.precompute_all = cache == "precompute"
        self.cache = None  # opened before the weights are prepared (sharded under FSDP and ZeRO-3)
        if cache != "none":
            self.cache = self._open(cache_dir, precision)

    def _open(self, cache_dir: str | None, precision: str) -> ReferenceCache:
        t0 = time.perf_counter()
        trainable = {id(p) for p in self.param.model.parameters() if p.requires_grad}
        with self.param.reference() as ref:
            fingerprint = model_fingerprint(ref, precision, trainable)
        dataset = hashlib.blake2b(b"".join(self.keys), digest_size=8).hexdigest()
        directory = Path(cache_dir or default_cache_dir())
        cache = ReferenceCache(directory, fingerprint, f"{dataset}-rank{self.engine.rank}")
        log.info("reference cache %s: %d pairs known (%.1f s to fingerprint and read)", cache.dir, len(cache),
                 time.perf_counter() - t0)
        return cache

    @contextmanager
    def scorer(self):
        """The reference as a scorer: the engine's prepared model where the reference forward is a collective, else a
        plain scorer (no collective: DDP's wrapper would broadcast buffers)."""
        with self.param.reference() as ref:
            module = self.engine.reference_module(ref, self.param.model)
            yield module if module is not None else SequenceScorer(ref, self.chunk_size)

    def forward(self, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), self.scorer() as ref, eval_mode(ref), self.engine.autocast():
            scores = ref(**batch.scorer_inputs())
        return scores.logps, scores.shared

    def logps(self, indices: list[int], batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's ``(logps, shared)`` of the batch's chosen then rejected, each ``(2B,)``: the sequences'
        log-probs and those of their pair's shared length (LD-DPO's). From the cache, the missing ones computed (and
        cached)."""
        if self.cache is None:
            return self.forward(batch)
        keys = [self.keys[i] for i in indices]
        values, missing = self.cache.lookup(keys)  # (B, 4): chosen, rejected, chosen shared, rejected shared
        if self.engine.collective_need(bool(missing)):  # a collective forward: all processes or none
            missing = list(range(len(keys)))
        if missing:
            sub = batch if len(missing) == len(indices) else self.collate([indices[j] for j in missing])
            m = len(missing)
            logps, shared = (t.float().cpu() for t in self.forward(sub))
            computed = torch.stack([logps[:m], logps[m:], shared[:m], shared[m:]], dim=1)
            self.cache.add([keys[j] for j in missing], computed)
            values[missing] = computed
        values = values.to(self.engine.device)
        return torch.cat([values[:, 0], values[:, 1]]), torch.cat([values[:, 2], values[:, 3]])

    def precompute(self, batch_size: int, progress: bool) -> None:
        """Fills the cache with every training pair (each process a share), then reads back all processes' files."""
        engine = self.engine
        own = range(engine.rank, len(self.pairs), engine.world)
        todo = sorted((i for i in own if self.keys[i] not in self.cache.values), key=lambda i: self.pairs[i].num_tokens)
        t0 = time.perf_counter()
        chunks = [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)]
        # the same number of forwards on every process where they are collectives: the short ones repeat one
        chunks += [chunks[-1] if chunks else [own[0] if own else 0]] * (engine.common_count(len(chunks)) - len(chunks))
        for chunk in progress_of(chunks, desc="reference", unit="batches", enabled=progress and engine.is_main):
            self.logps(chunk, self.collate(chunk))
        self.cache.save()
        engine.barrier()
        self.cache.read()  # the other processes' shares
        log.info("reference log-probs of %d pairs computed in %.1f s", len(todo), time.perf_counter() - t0)

    def save(self) -> None:
        if self.cache is not None:  # every process writes its own file
            self.cache.save()
