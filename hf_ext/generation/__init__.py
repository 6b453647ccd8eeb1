"""Generation add-ons for ``model.generate``: logits processors."""

from hf_ext.generation.caif import CAIFLogitsProcessor, caif_reference_scores

__all__ = ["CAIFLogitsProcessor", "caif_reference_scores"]
