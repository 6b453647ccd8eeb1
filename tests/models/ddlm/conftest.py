"""Markers of transformers' common tests that transformers registers in its own root ``conftest.py`` rather than in its
``pyproject.toml`` (the only place ``tests/peer/fetch_peer_tests.py`` reads markers from); without them
``--strict-markers`` refuses to collect ``test_modeling_ddlm_common.py``. Delete once the fetched suite carries them."""


def pytest_configure(config):
    config.addinivalue_line("markers", "accelerate_tests: tests of accelerate's big-model inference (transformers)")
    config.addinivalue_line("markers", "torch_compile_test: tests that compile the model (transformers)")
