"""A synthetic topic-classification task over the sentences of :mod:`hf_ext.data.sentiment`.

The same sentences as the sentiment corpus, labelled by what they are about rather than how they feel:
1 when the subject is a work (a movie, film, book, show, song or story), 0 when it is part of life (food, a trip,
a game, a day). A backbone tuned for sentiment must be adapted to read this task, which is what the
parameter-efficient methods in the AoT P-Tuning demo and example are compared on.
"""

import random

from hf_ext.data.sentiment import ADVERBS, NEGATIVE, POSITIVE, SUBJECTS, TAILS, VERBS

WORK_SUBJECTS = ["the movie", "the film", "this book", "the show", "that song", "the story"]
LIFE_SUBJECTS = [s for s in SUBJECTS if s not in WORK_SUBJECTS]


def topic_sentence(rng: random.Random, label: int) -> str:
    """One sentence whose subject is a work (``label`` 1) or part of life (0); the sentiment is random."""
    subject = rng.choice(WORK_SUBJECTS if label == 1 else LIFE_SUBJECTS)
    adjective = rng.choice(POSITIVE + NEGATIVE)
    return f"{subject} {rng.choice(VERBS)} {rng.choice(ADVERBS)} {adjective} {rng.choice(TAILS)} ."


def topic_dataset(num_examples: int = 1000, seed: int = 0):
    """A balanced ``datasets.Dataset`` with columns ``text`` (str) and ``label`` (int, 1 = about a work).

    Args:
        num_examples: number of rows (>= 1).
        seed: the same seed gives the same rows.
    """
    if num_examples < 1:
        raise ValueError(f"`num_examples` must be >= 1, got {num_examples}.")
    from datasets import Dataset

    rng = random.Random(seed)
    labels = [i % 2 for i in range(num_examples)]
    rng.shuffle(labels)
    return Dataset.from_dict({"text": [topic_sentence(rng, y) for y in labels], "label": labels})


__all__ = ["LIFE_SUBJECTS", "WORK_SUBJECTS", "topic_dataset", "topic_sentence"]
