"""A synthetic sentiment corpus over the vocabulary of :func:`hf_ext.testing.get_tiny_tokenizer`.

Sentences read "<subject> <verb> <adverb> <adjective> <tail> ." and the label is the adjective's
polarity (1 positive, 0 negative), so a classifier can learn the attribute and an LM can be tuned
towards it. Every word is in the tiny tokenizer's vocabulary.
"""

import random

SUBJECTS = ["the movie", "the film", "this book", "the food", "our trip", "the show", "that song", "the game", "my day", "the story"]
POSITIVE = ["great", "wonderful", "good", "lovely", "amazing", "excellent", "fun", "happy", "nice", "brilliant"]
NEGATIVE = ["terrible", "awful", "bad", "boring", "horrible", "poor", "sad", "dull", "ugly", "weak"]
VERBS = ["was", "is", "seemed", "felt", "looked"]
ADVERBS = ["really", "very", "quite", "truly", "so"]
TAILS = ["and i liked it", "and i hated it", "to everyone", "to me", "at the end", "from the start", "for a while", "all week"]


def sentiment_sentence(rng: random.Random, label: int) -> str:
    """One sentence whose adjective has polarity ``label`` (1 positive, 0 negative)."""
    adjective = rng.choice(POSITIVE if label == 1 else NEGATIVE)
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(ADVERBS)} {adjective} {rng.choice(TAILS)} ."


def sentiment_dataset(num_examples: int = 1000, seed: int = 0, positive_fraction: float = 0.5):
    """A ``datasets.Dataset`` with columns ``text`` (str) and ``label`` (int, 1 = positive).

    Args:
        num_examples: number of rows (>= 1).
        seed: the same seed gives the same rows.
        positive_fraction: share of positive rows, in [0, 1].
    """
    if num_examples < 1:
        raise ValueError(f"`num_examples` must be >= 1, got {num_examples}.")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"`positive_fraction` must be in [0, 1], got {positive_fraction}.")
    from datasets import Dataset

    rng = random.Random(seed)
    labels = [int(rng.random() < positive_fraction) for _ in range(num_examples)]
    return Dataset.from_dict({"text": [sentiment_sentence(rng, y) for y in labels], "label": labels})


__all__ = ["ADVERBS", "NEGATIVE", "POSITIVE", "SUBJECTS", "TAILS", "VERBS", "sentiment_dataset", "sentiment_sentence"]
