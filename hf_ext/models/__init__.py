"""transformers-style model folders, one per model_type."""
