"""Shared fixtures: tiny offline pieces from :mod:`hf_ext.testing`, fixed seeds, offline Hub."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The word-level tokenizer of :func:`hf_ext.testing.get_tiny_tokenizer` (right padding)."""
    from hf_ext.testing import get_tiny_tokenizer

    return get_tiny_tokenizer()


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
