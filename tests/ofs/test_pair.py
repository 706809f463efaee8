"""The fast/slow LoRA pair: reference = base, one routed forward = two separate ones, export loads in PEFT."""

import copy
import json
import math

import pytest
import torch
from conftest import make_tiny_model, sentiment_rows
from torch.testing import assert_close

from preflab.data.collate import collate_pairs
from preflab.data.formats import normalize_row
from preflab.data.tokenize import PairTokenizer
from preflab.models.scorer import SequenceScorer
from preflab.ofs.pair import FastSlowLora, FastSlowPair, Route, TwoLoraLinear, _targets, duplicate_rows


@pytest.fixture(scope="module")
def batch(tokenizer):
    rows = sentiment_rows(4)
    rows[1]["chosen"][0]["content"] = "A much longer answer than the others, " * 4
    pt = PairTokenizer(tokenizer)
    return collate_pairs([pt(normalize_row(r, f"row {i}")) for i, r in enumerate(rows)], tokenizer.pad_token_id,
                         "shared")


def _randomize(pair, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in pair.layers.values():
            for module in ("fast", "slow"):
                layer.lora_B[module].copy_(torch.randn(layer.lora_B[module].shape, generator=g) * 0.05)


def test_reference_is_the_base_and_both_modules_start_there(tokenizer, batch):
    base = make_tiny_model(tokenizer, seed=2)
    with torch.no_grad():
        want, _, _ = SequenceScorer(base)(**batch.scorer_inputs())
    pair = FastSlowLora(copy.deepcopy(base), r=4, alpha=8)
    for mode in ("off", "fast", "slow"):
        with torch.no_grad(), pair.routed(mode) as model:
            got, _, _ = SequenceScorer(model)(**batch.scorer_inputs())
        assert torch.equal(got, want), mode
    assert all(torch.equal(layer.lora_A["fast"], layer.lora_A["slow"]) for layer in pair.layers.values())
    trainable = [p for p in pair.model.parameters() if p.requires_grad]
    assert len(trainable) == 4 * len(pair.layers)
    with pytest.raises(ValueError, match="route mode 'both': expected off, fast, slow or split"), \
            torch.no_grad(), pair.routed("both") as model:
        SequenceScorer(model)(**batch.scorer_inputs())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_one_routed_forward_equals_two_separate_ones(tokenizer, batch, checkpointing):
    pair = FastSlowLora(make_tiny_model(tokenizer, seed=3), r=4, alpha=8)
    _randomize(pair, 0)
    pair.model.train()
    if checkpointing:
        pair.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    weights = torch.linspace(0.5, 1.5, 2 * batch.num_sequences)

    def grads():
        out = {n: p.grad.clone() for n, p in pair.model.named_parameters() if p.requires_grad}
        pair.model.zero_grad(set_to_none=True)
        return out

    separate, separate_shared = [], []
    for mode, w in (("fast", weights[:batch.num_sequences]), ("slow", weights[batch.num_sequences:])):
        with pair.routed(mode) as model:
            logps, _, shared = SequenceScorer(model, chunk_size=16)(**batch.scorer_inputs())
            (logps * w).sum().backward()
        separate.append(logps.detach())
        separate_shared.append(shared.detach())
    want = grads()
    with pair.routed("split", batch.input_ids.shape[0]) as model:
        fused, _, fused_shared = SequenceScorer(model, chunk_size=16)(**duplicate_rows(batch).scorer_inputs())
        (fused * weights).sum().backward()
    got = grads()
    assert_close(fused.detach(), torch.cat(separate), atol=1e-5, rtol=0)
    # each copy's shared-length log-probs (LD-DPO's) are its module's
    assert_close(fused_shared.detach(), torch.cat(separate_shared), atol=1e-5, rtol=0)
    assert not torch.allclose(separate[0], separate[1])  # the two modules differ: the routing matters
    for name in want:
        assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_module_exports_as_a_plain_peft_adapter(tokenizer, batch, tmp_path):
    from peft import PeftModel

    base = make_tiny_model(tokenizer, seed=4)
    pair = FastSlowLora(copy.deepcopy(base), r=4, alpha=8)
    _randomize(pair, 1)
    pair.save_adapter("slow", tmp_path / "slow")
    loaded = PeftModel.from_pretrained(base, tmp_path / "slow").eval()
    with torch.no_grad(), pair.routed("slow") as model:
        want, _, _ = SequenceScorer(model)(**batch.scorer_inputs())
        got, _, _ = SequenceScorer(loaded)(**batch.scorer_inputs())
    assert_close(got, want, atol=1e-5, rtol=0)


def test_the_merged_model_is_the_resting_module_folded_in(tokenizer, batch):
    param = FastSlowPair(make_tiny_model(tokenizer, seed=6), r=4, alpha=8)
    _randomize(param.pair, 2)
    param.rest_on("slow")
    with torch.no_grad():
        want, _, _ = SequenceScorer(param.model)(**batch.scorer_inputs())  # outside a route: the resting module
    merged = param.merged_model()
    assert not any(type(m).__name__ == "TwoLoraLinear" for m in merged.modules())
    with torch.no_grad():
        got, _, _ = SequenceScorer(merged)(**batch.scorer_inputs())
        again, _, _ = SequenceScorer(param.model)(**batch.scorer_inputs())
    assert_close(got, want, atol=1e-4, rtol=0)
    assert torch.equal(again, want)  # the pair itself is left as it was (a copy was merged)
    assert sum(type(m).__name__ == "TwoLoraLinear" for m in param.model.modules()) == len(param.pair.layers)


def test_row_masks_follow_the_split_shape_and_dtype_and_their_cache_stays_small():
    route = Route(mode="split", split=1)
    fast, slow = [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]
    m = route.row_mask(torch.zeros(3, 5, 7), 2)
    assert m.shape == (3, 1, 4) and m.dtype == torch.float32 and m[:, 0].tolist() == [fast, slow, slow]
    m = route.row_mask(torch.zeros(4, 5, 7), 2)  # more rows: a new mask, not the cached one
    assert m.shape == (4, 1, 4) and m[:, 0].tolist() == [fast, slow, slow, slow]
    route.split = 3
    assert route.row_mask(torch.zeros(4, 5, 7), 2)[:, 0].tolist() == [fast, fast, fast, slow]
    m = route.row_mask(torch.zeros(4, 7, dtype=torch.bfloat16), 2)  # 2-D input, bf16
    assert m.shape == (4, 4) and m.dtype == torch.bfloat16
    route._masks.clear()
    for rows in range(1, 66):
        route.row_mask(torch.zeros(rows, 7), 2)
    assert len(route._masks) == 65  # at most 65 masks kept
    route.row_mask(torch.zeros(66, 7), 2)
    assert len(route._masks) == 1  # the 66th clears the cache


def test_duplicated_rows_of_a_padded_batch(tokenizer):
    pt = PairTokenizer(tokenizer)
    padded = collate_pairs([pt(normalize_row(r, str(i))) for i, r in enumerate(sentiment_rows(2))],
                           tokenizer.pad_token_id, "padded")
    assert padded.position_ids is None
    twice = duplicate_rows(padded)
    assert twice.position_ids is None and twice.num_tokens == 2 * padded.num_tokens
    assert twice.num_sequences == 2 * padded.num_sequences and twice.input_ids.shape[0] == 2 * padded.input_ids.shape[0]
    s = padded.num_sequences
    second = twice.target_seq[padded.target_seq.shape[0]:]
    assert torch.equal(second[padded.target_seq >= 0], padded.target_seq[padded.target_seq >= 0] + s)
    assert (second[padded.target_seq < 0] == -1).all()


def test_the_pair_defaults_init_dtype_and_targets(tokenizer, tmp_path):
    base = torch.nn.Linear(64, 8)
    layer = TwoLoraLinear(base, 4, 8.0, Route())  # defaults: one start for both modules, no dropout
    assert torch.equal(layer.lora_A["fast"], layer.lora_A["slow"]) and isinstance(layer.dropout, torch.nn.Identity)
    bound = 1 / math.sqrt(64)  # PEFT's init: Kaiming-uniform with a = √5 gives U(−1/√in, 1/√in)
    apart = TwoLoraLinear(base, 16, 8.0, Route(), init_same=False)
    for a in (apart.lora_A["fast"], apart.lora_A["slow"]):
        assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound
    assert not torch.equal(apart.lora_A["fast"], apart.lora_A["slow"])

    model = make_tiny_model(tokenizer, seed=6)
    model.config._name_or_path = "some/tiny-base"
    lora = FastSlowLora(model.to(torch.bfloat16))  # defaults r = 16, α = 32
    one = next(iter(lora.layers.values()))
    assert one.lora_A["fast"].shape[0] == 16 and one.scale == 2.0
    assert {p.dtype for p in lora.parameters("fast") + lora.parameters("slow")} == {torch.bfloat16}
    lora.save_adapter("fast", tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "some/tiny-base"

    pair = FastSlowPair(make_tiny_model(tokenizer, seed=6), r=4, alpha=8)
    assert pair.resting == "fast"
    assert all(torch.equal(p, q) for p, q in zip(pair.parameters("fast")[::2], pair.parameters("slow")[::2]))
    with pair.routed("split"):
        assert pair.pair.route.split == 0

    class Toy(torch.nn.Module):  # a Linear at the top level of the model
        def __init__(self):
            super().__init__()
            self.proj, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

        def get_output_embeddings(self):
            return self.head

    assert _targets(Toy(), ("proj",)) == ["proj"] and _targets(Toy()) == ["proj"]
    with pytest.raises(ValueError, match=r"target_modules: no nn.Linear named \['nope'\] in LlamaForCausalLM"):
        _targets(model, ("nope",))
