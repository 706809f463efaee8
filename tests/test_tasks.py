"""Tasks: prompts are deterministic by seed and the train and eval splits share nothing."""

import pytest

from preflab.tasks import get_task, split_items, task_names

BUILT_IN = ["capitals", "concision", "format", "sentiment"]


@pytest.mark.parametrize("name", BUILT_IN)
def test_prompts_are_seeded_and_splits_are_disjoint(name):
    task = get_task(name)
    train, held_out = task.prompts("train", 0), task.prompts("eval", 0)
    assert train and held_out and not set(train) & set(held_out)
    assert task.prompts("train", 0) == train
    assert task.prompts("train", 1) != train  # another seed: another order (and for some tasks other draws)
    with pytest.raises(ValueError, match="split"):
        task.prompts("test", 0)
    assert task.make_reward()(held_out[:2], ["A fine answer.", "another"]) is not None


def test_every_built_in_task_is_registered():
    assert set(BUILT_IN) <= set(task_names())


def test_split_items_holds_out_every_eighth_item():
    items = list(range(20))
    assert split_items(items, "eval") == [7, 15]
    assert sorted(split_items(items, "train") + split_items(items, "eval")) == items
