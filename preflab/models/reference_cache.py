"""Reference log-probs computed once and reused: keyed by the reference model and by each pair's tokens.

The reference policy of an offline run never changes, so its log-probs of a pair are a function of the pair's
token ids and of the reference's weights (and of the precision they run in). :class:`ReferenceCache` keeps them
per pair, under a directory named by a fingerprint of the reference's frozen tensors: a changed model lands in
another directory (recomputed), a changed dataset has other pair keys (its new pairs are recomputed, unchanged
ones reused). Filled lazily by the training loop (a pair's first visit computes it) or all at once
(``scorer.reference_cache: precompute``); written atomically, one file per dataset and process, read back by
every later run of the same reference: seeds, β and learning-rate sweeps, resumed runs, later epochs.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..data.tokenize import TokenizedPair
from .loader import cache_root

FORMAT = "2"  # bump when what a cached value means changes (2: the shared-length log-probs beside the totals)
WIDTH = 4  # values per pair: chosen, rejected, chosen shared, rejected shared


def default_cache_dir() -> Path:
    return Path(os.environ.get("PREFLAB_REFERENCE_CACHE", cache_root() / "reference"))


def pair_key(pair: TokenizedPair) -> bytes:
    """16 bytes naming the pair's prompt, chosen and rejected token ids (lengths included)."""
    h = hashlib.blake2b(digest_size=16)
    for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
        h.update(len(ids).to_bytes(8, "little"))
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
    return h.digest()


def model_fingerprint(model: nn.Module, precision: str, trainable: set[int] = frozenset()) -> str:
    """A hash of the parameters and buffers of ``model`` (names, dtypes, shapes, bytes), its config and the
    precision it runs in, leaving out the parameters whose ``id`` is in ``trainable``: under a parametrization's
    ``reference()`` those are the adapter that is switched off (PEFT even marks it frozen there), and they change
    during training while the reference does not."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{FORMAT}|{precision}|".encode())
    config = getattr(model, "config", None)
    if config is not None:
        h.update(config.to_json_string(use_diff=False).encode())
    tensors = [(n, p) for n, p in model.named_parameters() if id(p) not in trainable] + list(model.named_buffers())
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


class ReferenceCache:
    """Reference log-probs of a pair by its key, for one reference model: chosen's and rejected's, and those of their
    first ``min(|y⁺|, |y⁻|)`` tokens (the pair's shared length, LD-DPO's input).

    Args:
        directory: the cache root; this model's entries live in ``directory/<fingerprint>/``.
        fingerprint: :func:`model_fingerprint` of the reference.
        name: the file this process writes (e.g. a hash of its dataset and its rank); every file of the
            model's directory is read.
    """

    def __init__(self, directory: Path, fingerprint: str, name: str):
        self.dir = Path(directory) / fingerprint
        self.path = self.dir / f"{name}.safetensors"
        self.values: dict[bytes, tuple[float, ...]] = {}  # (chosen, rejected, chosen shared, rejected shared)
        self.own: set[bytes] = set()  # the entries this file holds: read from it or added here
        self.dirty = False
        self.read()

    def read(self) -> None:
        """Adds the entries of every file of this model's directory (other processes' and runs' included)."""
        for file in sorted(self.dir.glob("*.safetensors")) if self.dir.is_dir() else []:
            try:
                data = load_file(file)
                keys, logps = [bytes(k) for k in data["keys"].numpy()], data["logps"]
                if logps.shape != (len(keys), WIDTH):
                    continue
            except Exception:  # an unreadable file only costs a recomputation
                continue
            self.values.update(zip(keys, map(tuple, logps.tolist())))
            if file == self.path:
                self.own.update(keys)

    def __len__(self) -> int:
        return len(self.values)

    def lookup(self, keys: list[bytes]) -> tuple[Tensor, list[int]]:
        """(B, 4) float32 of the cached (chosen, rejected, chosen shared, rejected shared) log-probs (NaN where
        missing), and the missing indices."""
        out = torch.full((len(keys), WIDTH), float("nan"), dtype=torch.float32)
        missing = []
        for i, key in enumerate(keys):
            value = self.values.get(key)
            if value is None:
                missing.append(i)
            else:
                out[i] = torch.tensor(value)
        return out, missing

    def add(self, keys: list[bytes], values: Tensor) -> None:
        """``values`` (B, 4) as :meth:`lookup` returns them."""
        for key, value in zip(keys, values.tolist()):
            self.values[key] = tuple(value)
            self.own.add(key)
        self.dirty = True

    def save(self) -> None:
        """Write this file's entries (temporary name, then rename); other files are only read."""
        if not self.dirty:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        own = sorted(self.own)
        keys = np.frombuffer(b"".join(own), dtype=np.uint8).reshape(-1, 16)
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        save_file({"keys": torch.from_numpy(keys.copy()),
                   "logps": torch.tensor([self.values[k] for k in own], dtype=torch.float32).reshape(-1, WIDTH)}, tmp)
        os.replace(tmp, self.path)
        self.dirty = False
