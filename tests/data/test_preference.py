"""Tests for hf_ext.data.preference: the known reward, the pair ordering, determinism and errors."""

import pytest

from hf_ext.data.preference import preference_dataset, preference_reward
from hf_ext.data.sentiment import NEGATIVE, POSITIVE


@pytest.mark.parametrize(
    ("text", "reward"),
    [
        (" great and awful to me .", 0),
        (" good and lovely at the end .", 2),
        (" sad and dull all week .", -2),
        ("nothing here", 0),
        ("Great, GOOD!", 2),
    ],
)
def test_reward_counts_positive_minus_negative_adjectives(text, reward):
    assert preference_reward(text) == reward


def test_pairs_are_ordered_by_the_known_reward_and_tokenize_without_unknowns(tiny_tokenizer):
    ds = preference_dataset(64, seed=3)
    assert ds.column_names == ["prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"]
    for row in ds:
        assert (
            row["chosen_reward"]
            == preference_reward(row["chosen"])
            > preference_reward(row["rejected"])
            == row["rejected_reward"]
        )
        words = row["chosen"].split()
        assert words[1] == "and" and {words[0], words[2]} <= set(POSITIVE) | set(NEGATIVE)
        ids = tiny_tokenizer(row["prompt"] + row["chosen"] + row["rejected"])["input_ids"]
        assert tiny_tokenizer.unk_token_id not in ids


def test_seeded_and_varied():
    assert preference_dataset(16, seed=1).to_dict() == preference_dataset(16, seed=1).to_dict()
    assert preference_dataset(16, seed=1)["prompt"] != preference_dataset(16, seed=2)["prompt"]
    assert len(set(preference_dataset(64)["chosen"])) > 20


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_num_examples_raises(bad):
    with pytest.raises(ValueError, match="`num_examples`"):
        preference_dataset(bad)
