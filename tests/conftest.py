"""Shared fixtures: tiny offline pieces from :mod:`hf_ext.testing`, fixed seeds, offline Hub."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The peer libraries' own test suites (tests/peer/fetch_peer_tests.py) import as `transformers_tests`,
# `peft_tests`, ...; their files are imported by hf_ext's test modules, never collected themselves.
_PEER = Path(__file__).resolve().parent / "peer"
sys.path[:0] = [str(_PEER), str(_PEER / "_suites")]
collect_ignore = ["peer/_suites"]


def pytest_configure(config):
    # The markers the peers' tests apply (`generate`, `flash_attn_test`, ...), which the fetch script lists:
    # pytest runs with --strict-markers.
    for markers in sorted((_PEER / "_suites").glob("*/markers.txt")):
        for marker in markers.read_text().splitlines():
            config.addinivalue_line("markers", marker)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The word-level tokenizer of :func:`hf_ext.testing.get_tiny_tokenizer` (right padding)."""
    from hf_ext.testing import get_tiny_tokenizer

    return get_tiny_tokenizer()


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
