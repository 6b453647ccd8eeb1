"""MQAR builder: the task's structure, its power-law query gaps, the accuracy metric and argument checks."""

import numpy as np
import pytest
import torch

from hf_ext.data.mqar import mqar_accuracy, mqar_dataset


def test_sequences_have_the_tasks_structure():
    ds = mqar_dataset(20, seq_len=32, num_kv_pairs=4, vocab_size=100, seed=1)
    for row in ds:
        ids, labels = row["input_ids"], row["labels"]
        keys, values = ids[0:8:2], ids[1:8:2]
        assert len(set(keys)) == 4 and all(1 <= k < 50 for k in keys)
        assert len(set(values)) == 4 and all(50 <= v < 100 for v in values)
        queries = [p for p in range(8, 32) if ids[p] != 0]
        assert sorted(ids[p] for p in queries) == sorted(keys)  # each key is queried once, filler elsewhere
        assert all((p - 8) % 2 == 0 for p in queries)
        # the label right after a query is its key's value; nothing else is scored
        assert {p + 1: labels[p + 1] for p in queries} == {p + 1: values[keys.index(ids[p])] for p in queries}
        assert sum(label != -100 for label in labels) == 4


def test_same_seed_same_rows_and_power_law_gaps():
    assert mqar_dataset(5, seq_len=64, seed=3)["input_ids"] == mqar_dataset(5, seq_len=64, seed=3)["input_ids"]
    ds = mqar_dataset(400, seq_len=256, num_kv_pairs=4, vocab_size=1000, power_a=0.01, seed=0)
    gaps = np.array([(p - 8) // 2 for ids in ds["input_ids"] for p in range(8, 256) if ids[p] != 0])
    # p(g) ∝ g^(a-1) with a = 0.01 favours small gaps: uniform gaps over the 124 slots would put 3% in the first 4
    assert (gaps < 4).mean() > 0.25
    assert (gaps == 0).sum() > (gaps == 10).sum() * 3


def test_accuracy_counts_only_scored_positions():
    labels = torch.tensor([[-100, -100, 7, -100, 9]])
    logits = torch.zeros(1, 5, 10)
    logits[0, 1, 7] = 1.0  # position 1 predicts token 2: right
    logits[0, 3, 2] = 1.0  # position 3 predicts token 4: wrong (9 expected)
    logits[0, 0, 5] = 1.0  # unscored
    assert mqar_accuracy(logits, labels) == 0.5


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_examples=0), "num_examples"),
        (dict(num_examples=2, seq_len=31), "seq_len"),
        (dict(num_examples=2, seq_len=32, num_kv_pairs=9), "num_kv_pairs"),
        (dict(num_examples=2, seq_len=32, num_kv_pairs=4, vocab_size=8), "vocab_size"),
        (dict(num_examples=2, power_a=0.0), "power_a"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        mqar_dataset(**kwargs)
