import pytest

from hf_ext.data.sentiment import NEGATIVE, POSITIVE, sentiment_dataset


def test_labels_follow_the_adjective_and_are_seeded():
    ds = sentiment_dataset(200, seed=3)
    assert ds.column_names == ["text", "label"] and len(ds) == 200
    for text, label in zip(ds["text"], ds["label"], strict=True):
        words = set(text.split())
        assert bool(words & set(POSITIVE)) == (label == 1)
        assert bool(words & set(NEGATIVE)) == (label == 0)
    assert sentiment_dataset(200, seed=3)["text"] == ds["text"]
    assert sentiment_dataset(200, seed=4)["text"] != ds["text"]


def test_positive_fraction():
    assert sum(sentiment_dataset(100, positive_fraction=1.0)["label"]) == 100
    assert sum(sentiment_dataset(100, positive_fraction=0.0)["label"]) == 0


@pytest.mark.parametrize(("kwargs", "match"), [({"num_examples": 0}, "`num_examples`"), ({"positive_fraction": 1.5}, "`positive_fraction`")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sentiment_dataset(**kwargs)
