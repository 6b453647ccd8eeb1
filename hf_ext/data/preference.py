"""A synthetic preference dataset with a known reward, over the tiny tokenizer's vocabulary.

Prompts read "<subject> <verb> <adverb>" and completions "<adjective> and <adjective> <tail> .", with
words from :mod:`hf_ext.data.sentiment`. The reward of a completion is known in closed form,
:func:`preference_reward`: the number of positive adjectives minus the number of negative ones. Of
two completions with different rewards, the one with the higher reward is ``chosen``. So a policy
tuned on the pairs should move towards positive adjectives, and its samples can be scored exactly.
"""

import random
import re

from hf_ext.data.sentiment import ADVERBS, NEGATIVE, POSITIVE, SUBJECTS, TAILS, VERBS

_POSITIVE_SET = frozenset(POSITIVE)
_NEGATIVE_SET = frozenset(NEGATIVE)


def preference_reward(text: str) -> int:
    """The known reward of a text: (# positive adjectives) - (# negative adjectives).

    Words are split on white space and punctuation, as the tiny tokenizer splits them.

    Examples:

    >>> preference_reward("great and awful to me .")
    0
    >>> preference_reward("good and lovely at the end .")
    2
    """
    words = re.findall(r"[\w']+", text.lower())
    return sum(w in _POSITIVE_SET for w in words) - sum(w in _NEGATIVE_SET for w in words)


def _completion(rng: random.Random) -> str:
    adjectives = [rng.choice(POSITIVE if rng.random() < 0.5 else NEGATIVE) for _ in range(2)]
    return f" {adjectives[0]} and {adjectives[1]} {rng.choice(TAILS)} ."


def preference_prompt(rng: random.Random) -> str:
    """A prompt "<subject> <verb> <adverb>" (no trailing space; completions start with one)."""
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(ADVERBS)}"


def preference_dataset(num_examples: int = 512, seed: int = 0):
    """A ``datasets.Dataset`` of preference pairs in TRL's standard (non-conversational) format.

    Args:
        num_examples: number of rows (>= 1).
        seed: the same seed gives the same rows.

    Returns:
        A ``Dataset`` with columns ``prompt``, ``chosen``, ``rejected`` (str) and ``chosen_reward``,
        ``rejected_reward`` (int, :func:`preference_reward` of each completion;
        ``chosen_reward > rejected_reward`` on every row).

    Examples:

    >>> ds = preference_dataset(4, seed=0)
    >>> all(r["chosen_reward"] > r["rejected_reward"] for r in ds)
    True
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"`num_examples` must be an integer >= 1, got {num_examples!r}.")
    from datasets import Dataset

    rng = random.Random(seed)
    rows = {"prompt": [], "chosen": [], "rejected": [], "chosen_reward": [], "rejected_reward": []}
    while len(rows["prompt"]) < num_examples:
        prompt, first, second = preference_prompt(rng), _completion(rng), _completion(rng)
        first_reward, second_reward = preference_reward(first), preference_reward(second)
        if first_reward == second_reward:  # no preference between them: draw again
            continue
        if first_reward < second_reward:
            first, second, first_reward, second_reward = second, first, second_reward, first_reward
        for key, value in zip(rows, (prompt, first, second, first_reward, second_reward), strict=True):
            rows[key].append(value)
    return Dataset.from_dict(rows)


__all__ = ["preference_dataset", "preference_prompt", "preference_reward"]
