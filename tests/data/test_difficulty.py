import pytest

from hf_ext.data.difficulty import NEUTRAL, difficulty_dataset, max_difficulty
from hf_ext.data.sentiment import NEGATIVE, POSITIVE


def test_labels_and_difficulties_follow_the_words():
    data = difficulty_dataset(300, seed=3, num_polar=7, num_neutral=2).to_dict()
    assert set(data["difficulty"]) == {0, 1, 2, 3}
    for text, label, difficulty in zip(data["text"], data["label"], data["difficulty"], strict=True):
        words = text.split()
        positive, negative = sum(w in POSITIVE for w in words), sum(w in NEGATIVE for w in words)
        assert (positive, negative, len(words)) == (positive, 7 - positive, 9)
        assert sum(w in NEUTRAL for w in words) == 2
        assert label == int(positive > negative)
        assert difficulty == min(positive, negative)


def test_seeded_and_in_the_tiny_vocabulary(tiny_tokenizer):
    a, b = difficulty_dataset(50, seed=1), difficulty_dataset(50, seed=1)
    assert a.to_dict() == b.to_dict() and list(a["text"]) != list(difficulty_dataset(50, seed=2)["text"])
    ids = tiny_tokenizer(list(a["text"]))["input_ids"]
    assert tiny_tokenizer.unk_token_id not in {i for row in ids for i in row}


def test_max_difficulty_leaves_no_ties():
    assert [max_difficulty(n) for n in (1, 2, 3, 4, 5)] == [0, 0, 1, 1, 2]


@pytest.mark.parametrize("kwargs, field", [({"num_examples": 0}, "num_examples"), ({"num_polar": 0}, "num_polar"),
                                           ({"num_neutral": -1}, "num_neutral")])
def test_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        difficulty_dataset(**kwargs)
