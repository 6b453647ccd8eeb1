"""Touches of transformers' private names (see :mod:`hf_ext._compat`)."""
