"""Seeded synthetic datasets, each built as a ``datasets.Dataset`` with no download.

One module a family: ``sentiment`` (an attribute corpus over the tiny tokenizer's vocabulary);
methods add theirs (``mqar``, preference pairs, ...).
"""
