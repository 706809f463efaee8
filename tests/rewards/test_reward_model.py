"""A sequence-classification model as a reward (``rm:PATH``), on a tiny random one built in code."""

import torch
from conftest import tiny_config
from transformers import LlamaForSequenceClassification

from preflab.rewards import get_reward


def test_reward_model_scores_are_its_first_logit(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_config(len(tokenizer), num_labels=1)).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reward = get_reward(f"rm:{tmp_path}")
    prompts, responses = ["Say hi.", "Say bye."], ["Hello there!", "Goodbye."]
    scores = reward(prompts, responses)
    assert len(scores) == 2 and scores[0] != scores[1]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."},
                                         {"role": "assistant", "content": "Hello there!"}], tokenize=False)
    with torch.no_grad():
        expected = model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
    assert abs(scores[0] - expected) < 1e-4  # batching with padding does not change a score
