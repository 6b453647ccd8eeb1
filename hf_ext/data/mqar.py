"""Multi-query associative recall (MQAR), built as the ReBased paper builds it.

Zoology's MQAR task (Arora et al., 2023), with the settings of the ReBased paper (arXiv 2402.10644,
code `corl-team/rebased`, `src/data/associative_recall.py::multiquery_ar`): a sequence starts with
`num_kv_pairs` key-value pairs, keys drawn without replacement from `[1, vocab_size // 2)` and values
from `[vocab_size // 2, vocab_size)`. Each key is then queried once, at a gap drawn (without
replacement) from a power law `p(g) ∝ g^(a - 1)`, `a = power_a`, so most queries come soon after the
pairs. Other positions hold the filler token 0. The model must output the key's value right after the
query.

Labels follow the transformers convention (the model shifts them): for a query at position `p`,
`labels[p + 1]` is its value; every other label is -100. The authors' code stores the same targets
pre-shifted (`labels[p]`).
"""

import numpy as np
import torch

# Sequence length -> number of key-value pairs in the paper's MQAR sweep.
PAPER_KV_PAIRS = {128: 16, 256: 64, 512: 128, 1024: 256, 2048: 512}


def _check_arguments(num_examples, seq_len, num_kv_pairs, vocab_size, power_a):
    for name, value in (("num_examples", num_examples), ("seq_len", seq_len), ("num_kv_pairs", num_kv_pairs),
                        ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if seq_len % 2:
        raise ValueError(f"`seq_len` must be even, got {seq_len}.")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(f"`num_kv_pairs` must be at most `seq_len` / 4 = {seq_len // 4}, got {num_kv_pairs}.")
    if vocab_size // 2 - 1 < num_kv_pairs:
        raise ValueError(
            f"`vocab_size` ({vocab_size}) leaves {vocab_size // 2 - 1} keys, fewer than `num_kv_pairs` ({num_kv_pairs})."
        )
    if not 0 < power_a <= 1:
        raise ValueError(f"`power_a` must be in (0, 1], got {power_a}.")


def mqar_dataset(
    num_examples: int,
    seq_len: int = 64,
    num_kv_pairs: int = 4,
    vocab_size: int = 8192,
    power_a: float = 0.01,
    seed: int = 0,
):
    """Build `num_examples` MQAR sequences as a `datasets.Dataset`.

    Args:
        num_examples: number of sequences.
        seq_len: sequence length (even).
        num_kv_pairs: key-value pairs per sequence, at most `seq_len / 4` (queries need the room).
        vocab_size: tokens `[0, vocab_size)`; 0 is the filler, keys and values split the rest in halves.
        power_a: exponent `a` of the query-gap power law `p(g) ∝ g^(a - 1)` (1 is uniform; the paper uses 0.01).
        seed: the same seed gives the same rows (use different seeds for train and test).

    Returns:
        A `Dataset` with columns `input_ids` and `labels` (lists of `seq_len` ints).

    Examples:

    >>> ds = mqar_dataset(2, seq_len=16, num_kv_pairs=2, vocab_size=20, seed=0)
    >>> row = ds[0]
    >>> len(row["input_ids"]), sum(label != -100 for label in row["labels"])
    (16, 2)
    >>> all(10 <= label < 20 for label in row["labels"] if label != -100)
    True
    """
    _check_arguments(num_examples, seq_len, num_kv_pairs, vocab_size, power_a)
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    context = 2 * num_kv_pairs
    space = (seq_len - context) // 2  # query slots: every other position after the pairs
    gap_p = np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    gap_p /= gap_p.sum()
    inputs = np.zeros((num_examples, seq_len), dtype=np.int64)
    labels = np.full((num_examples, seq_len), -100, dtype=np.int64)
    for row in range(num_examples):
        keys = rng.choice(np.arange(1, vocab_size // 2), size=num_kv_pairs, replace=False)
        values = rng.choice(np.arange(vocab_size // 2, vocab_size), size=num_kv_pairs, replace=False)
        inputs[row, 0:context:2], inputs[row, 1:context:2] = keys, values
        query_pos = context + 2 * rng.choice(space, size=num_kv_pairs, replace=False, p=gap_p)
        inputs[row, query_pos] = keys
        labels[row, query_pos + 1] = values
    return Dataset.from_dict({"input_ids": inputs.tolist(), "labels": labels.tolist()})


def mqar_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of queries whose value is the argmax prediction.

    Args:
        logits: `[B, T, V]` causal-LM logits (position `t` predicts token `t + 1`).
        labels: `[B, T]` labels as :func:`mqar_dataset` gives them.

    Returns:
        Accuracy over the non -100 labels, in [0, 1].
    """
    predictions, targets = logits[:, :-1].argmax(-1), labels[:, 1:]
    scored = targets != -100
    return (predictions[scored] == targets[scored]).float().mean().item()


__all__ = ["PAPER_KV_PAIRS", "mqar_accuracy", "mqar_dataset"]
