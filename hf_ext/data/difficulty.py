"""A synthetic classification task whose difficulty varies by example (for early-exit models such as PALBERT).

Each text is a shuffled bag of `num_polar` sentiment adjectives and `num_neutral` neutral words; the
label is 1 when positive adjectives outnumber negative ones. The difficulty is the number of
adjectives of the losing polarity: difficulty 0 is unanimous ("great good lovely ..."), and the
largest difficulty, (num_polar - 1) // 2, leaves a margin of one word, so the model must count. Every
word is in the vocabulary of :func:`hf_ext.testing.get_tiny_tokenizer`.
"""

import random

from hf_ext.data.sentiment import ADVERBS, NEGATIVE, POSITIVE, VERBS

NEUTRAL = VERBS + ADVERBS


def max_difficulty(num_polar: int) -> int:
    """The largest difficulty for `num_polar` adjectives: a margin of one (odd) or two (even) words."""
    return (num_polar - 1) // 2


def difficulty_example(
    rng: random.Random, label: int, difficulty: int, num_polar: int = 5, num_neutral: int = 3
) -> str:
    """One text with label `label` and `difficulty` adjectives of the opposite polarity."""
    winners, losers = (POSITIVE, NEGATIVE) if label == 1 else (NEGATIVE, POSITIVE)
    words = [rng.choice(winners) for _ in range(num_polar - difficulty)]
    words += [rng.choice(losers) for _ in range(difficulty)]
    words += [rng.choice(NEUTRAL) for _ in range(num_neutral)]
    rng.shuffle(words)
    return " ".join(words)


def difficulty_dataset(num_examples: int = 1000, seed: int = 0, num_polar: int = 5, num_neutral: int = 3):
    """A ``datasets.Dataset`` with columns ``text`` (str), ``label`` (int, 1 = more positive words) and
    ``difficulty`` (int in 0..(num_polar - 1) // 2, uniform).

    Args:
        num_examples: number of rows (>= 1).
        seed: the same seed gives the same rows.
        num_polar: adjectives per text (odd numbers avoid ties; >= 1).
        num_neutral: neutral words per text (>= 0).
    """
    if num_examples < 1:
        raise ValueError(f"`num_examples` must be >= 1, got {num_examples}.")
    if num_polar < 1:
        raise ValueError(f"`num_polar` must be >= 1, got {num_polar}.")
    if num_neutral < 0:
        raise ValueError(f"`num_neutral` must be >= 0, got {num_neutral}.")
    from datasets import Dataset

    rng = random.Random(seed)
    labels = [rng.randrange(2) for _ in range(num_examples)]
    difficulties = [rng.randint(0, max_difficulty(num_polar)) for _ in range(num_examples)]
    texts = [difficulty_example(rng, y, d, num_polar, num_neutral) for y, d in zip(labels, difficulties, strict=True)]
    return Dataset.from_dict({"text": texts, "label": labels, "difficulty": difficulties})


__all__ = ["NEUTRAL", "difficulty_dataset", "difficulty_example", "max_difficulty"]
