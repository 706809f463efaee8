"""The reference cache: keys that change with the data and the model, and a loop that uses it where valid."""

import json

import pytest
import torch
from conftest import make_tiny_model, sentiment_rows, write_jsonl
from safetensors.torch import save_file

from preflab.adapters import build_parametrization
from preflab.adapters.lora import LoraParams
from preflab.config import load_config
from preflab.data.tokenize import TokenizedPair
from preflab.models.reference_cache import ReferenceCache, model_fingerprint, pair_key
from preflab.train import train
from preflab.train.reference import ReferenceLogps


def test_pair_key_names_every_token_and_the_boundaries():
    pair = TokenizedPair((1, 2, 3), (4, 5), (6,))
    assert pair_key(pair) == pair_key(TokenizedPair((1, 2, 3), (4, 5), (6,), where="elsewhere"))
    for other in [TokenizedPair((1, 2, 3), (4, 5), (7,)), TokenizedPair((1, 2), (3, 4, 5), (6,)),
                  TokenizedPair((1, 2, 3), (4,), (5, 6)), TokenizedPair((1, 2, 3), (6,), (4, 5))]:
        assert pair_key(other) != pair_key(pair)


def test_fingerprint_follows_frozen_weights_not_the_adapter(tokenizer):
    param = build_parametrization("lora", LoraParams(r=4), make_tiny_model(tokenizer))
    trainable = {id(p) for p in param.model.parameters() if p.requires_grad}
    with param.reference() as ref:
        before = model_fingerprint(ref, "fp32", trainable)
        assert model_fingerprint(ref, "bf16", trainable) != before
    with torch.no_grad():  # training moves the adapter: the reference (adapter off) is the same model
        for p in param.model.parameters():
            if p.requires_grad:
                p.add_(0.5)
    with param.reference() as ref:
        assert model_fingerprint(ref, "fp32", trainable) == before
    with torch.no_grad():
        param.model.get_base_model().model.layers[0].mlp.up_proj.base_layer.weight[0, 0] += 1e-3
    with param.reference() as ref:
        assert model_fingerprint(ref, "fp32", trainable) != before


def test_cache_round_trip_and_unreadable_files(tmp_path):
    keys = [bytes([i]) * 16 for i in range(3)]
    cache = ReferenceCache(tmp_path, "model", "data-rank0")
    # per pair: chosen, rejected, and the log-probs of their shared length (LD-DPO's)
    cache.add(keys[:2], torch.tensor([[-1.5, -3.5, -1.0, -2.0], [-2.5, -4.25, -2.5, -4.0]]))
    cache.save()
    (tmp_path / "model" / "broken.safetensors").write_bytes(b"not a safetensors file")
    # a file of an older format (chosen, rejected only) is skipped, not misread
    save_file({"keys": torch.full((1, 16), 2, dtype=torch.uint8), "logps": torch.tensor([[-7.0, -8.0]])},
              tmp_path / "model" / "old.safetensors")
    again = ReferenceCache(tmp_path, "model", "other-rank0")
    values, missing = again.lookup(keys)
    assert missing == [2]
    assert values[:2].tolist() == [[-1.5, -3.5, -1.0, -2.0], [-2.5, -4.25, -2.5, -4.0]] and values[2].isnan().all()
    assert ReferenceCache(tmp_path, "another-model", "x").lookup(keys)[1] == [0, 1, 2]
    again.add(keys[2:], torch.tensor([[-5.0, -6.0, -5.0, -5.5]]))
    again.save()  # a file holds its own entries only; every file is read
    assert len(ReferenceCache(tmp_path, "model", "other-rank0").own) == 1
    assert ReferenceCache(tmp_path, "model", "third").lookup(keys)[1] == []
    assert not list((tmp_path / "model").glob(".*tmp*"))  # written under a temporary name, then renamed


@pytest.fixture
def counted(monkeypatch):
    """Counts the pairs whose reference log-probs the loop computes."""
    seen = {"pairs": 0, "calls": 0}
    original = ReferenceLogps.forward

    def counting(self, batch):
        seen["pairs"] += batch.num_pairs
        seen["calls"] += 1
        return original(self, batch)

    monkeypatch.setattr(ReferenceLogps, "forward", counting)
    return seen


def _run(model_dir, data, out, cache_dir, *extra):
    config = load_config(None, [f"model.name={model_dir}", f"data.train={data}", f"output_dir={out}",
                                "data.eval=null", "train.progress=false", "train.warmup_ratio=0", "train.max_steps=3",
                                "train.batch_size=4", "train.lr=1e-3", "parametrization.kind=lora",
                                "diag.enabled=false", f"scorer.reference_cache_dir={cache_dir}", *extra])
    train(config)
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_loop_computes_each_reference_once(tiny_model_dir, tokenizer, tmp_path, counted):
    data = write_jsonl(tmp_path / "pairs.jsonl", sentiment_rows(8))
    cache = tmp_path / "cache"
    first = _run(tiny_model_dir, data, tmp_path / "a", cache)
    assert counted["pairs"] == 8  # 3 steps of 4 pairs = 1.5 epochs: the second epoch is served by the cache

    counted["pairs"] = 0
    again = _run(tiny_model_dir, data, tmp_path / "b", cache)  # a second run of the same data and model
    assert counted["pairs"] == 0 and again == first

    plain = _run(tiny_model_dir, data, tmp_path / "c", cache, "scorer.reference_cache=none")
    assert counted["pairs"] == 12 and plain == pytest.approx(first, abs=1e-6)

    counted["pairs"] = 0  # one changed row: that pair alone is computed
    rows = sentiment_rows(8)
    rows[5]["chosen"][0]["content"] = "Changed."
    _run(tiny_model_dir, write_jsonl(tmp_path / "changed.jsonl", rows), tmp_path / "d", cache)
    assert counted["pairs"] == 1

    counted["pairs"] = 0  # another model: everything again, in its own directory
    other = tmp_path / "other-model"
    make_tiny_model(tokenizer, seed=9).save_pretrained(other)
    tokenizer.save_pretrained(other)
    _run(other, data, tmp_path / "e", cache)
    assert counted["pairs"] == 8
    assert len([d for d in cache.iterdir() if d.is_dir()]) == 2

    counted["pairs"], counted["calls"] = 0, 0  # precompute: all pairs before the first step, in eval batches
    _run(other, data, tmp_path / "f", tmp_path / "cache2", "scorer.reference_cache=precompute",
         "train.eval_batch_size=3")
    assert counted == {"pairs": 8, "calls": 3}
