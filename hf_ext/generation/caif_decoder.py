"""Causal (decoder) classifiers for CAIF: per-row prefix caches and packed candidate forwards.

A ``...ForSequenceClassification`` head over a decoder (GPT-2, Llama, ...) judges ``prefix + x`` from the hidden
state of one token, which depends only on the tokens up to it. So each row's prefix keys/values can be kept from one
generation step to the next, and a step encodes only the candidates' new tokens. :class:`PrefixCachedDecoder` holds
those caches and runs the packed forwards for :class:`~hf_ext.generation.caif.CAIFLogitsProcessor`.
"""

import inspect

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def cut_after_last_non_pad(ids: list[int], pad_token_id: int | None) -> list[int]:
    """``ids`` up to the token a decoder's classification head reads.

    ``...ForSequenceClassification`` heads over decoders (GPT-2, Llama, ...) read the last token that is not
    ``config.pad_token_id`` (the first token when all are). A decoder's hidden state there depends only on the tokens
    up to it, so cutting the sequence after it gives the same class logits read at its last token. It matters when a
    candidate is the pad token, e.g. EOS for GPT-2 classifiers whose pad token is EOS.
    """
    if pad_token_id is None or not ids or ids[-1] != pad_token_id:
        return ids
    end = len(ids)
    while end > 1 and ids[end - 1] == pad_token_id:
        end -= 1
    return ids[:end]


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share (keys/values of those positions are the same in both)."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def is_packable_decoder_classifier(classifier) -> bool:
    """A sequence-classification head (``score``) over a decoder, as in GPT2/LlamaForSequenceClassification, whose
    decoder takes what the packed candidate forward needs: custom 4D masks (``sdpa`` or ``eager`` attention) and
    explicit ``position_ids``, with full attention in every layer (the 4D mask replaces a sliding window's).
    ALiBi decoders (Bloom, MPT, Falcon with ``alibi``) derive positions from the mask instead. Other decoders go
    through the classifier's own forward."""
    config = classifier.config
    return (
        is_decoder_classifier(classifier)
        and getattr(config, "_attn_implementation", "eager") in ("sdpa", "eager")
        and "position_ids" in inspect.signature(classifier.base_model.forward).parameters
        and not getattr(config, "alibi", False)
        and _full_attention_only(config)
    )


def is_decoder_classifier(classifier) -> bool:
    """A ``score`` head over a decoder: HF reads its class logits at the last token that is not ``config.pad_token_id``."""
    return classifier.config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and isinstance(
        getattr(classifier, "score", None), nn.Linear
    )


def _full_attention_only(config) -> bool:
    """Full attention in every layer (no sliding window)."""
    config = config.get_text_config()
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        return False
    return getattr(config, "sliding_window", None) is None or getattr(config, "use_sliding_window", True) is False


class RowCache:
    """Keys/values of one row's classifier prefix: ``ids`` and per layer ``(k, v)`` of shape ``[H, len(ids), D]``."""

    def __init__(self):
        self.ids: list[int] = []
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def crop(self, length: int) -> None:
        self.ids = self.ids[:length]
        self.layers = [(k[:, :length], v[:, :length]) for k, v in self.layers]


def _left_padded(owner: "RowCache | None", layer: int, j: int, P: int, like) -> torch.Tensor:
    """A row cache's keys (``j=0``) or values (``j=1``) of ``layer``, left-padded with zeros to ``P`` positions."""
    if owner is None or not owner.ids:  # no past: all padding (masked out)
        ref = like[layer][j]
        return ref.new_zeros(ref.shape[0], P, ref.shape[2])
    x = owner.layers[layer][j]  # (H, len, D)
    return nn.functional.pad(x, (0, 0, P - x.shape[1], 0))


class PrefixCachedDecoder:
    """Class logits of a causal classifier for blocks of new tokens continuing cached per-row prefixes.

    Args:
        classifier (`PreTrainedModel`): a classifier for which :func:`is_packable_decoder_classifier` holds.
        pad_token_id (`int`): fills the packed input ids past each sequence's end (masked out).
        max_blocks (`int`): most blocks per forward (the processor's `classifier_batch_size`).
    """

    def __init__(self, classifier, pad_token_id: int, max_blocks: int):
        self.classifier = classifier
        self.pad_token_id = pad_token_id
        self.max_blocks = max_blocks
        self.row_caches: list[RowCache] = []

    def logits(
        self, blocks: list[list[int]], owners: list[RowCache | None], past_lengths: list[int], keep_cache: bool = False
    ) -> tuple[torch.Tensor, list[list[tuple[torch.Tensor, torch.Tensor]]]]:
        """Run a causal classifier on ``blocks`` of new tokens, block ``n`` continuing the first ``past_lengths[n]``
        tokens of ``owners[n]`` (``None``: no past).

        Blocks that continue the same row cache are packed into one sequence after that row's past, and a 4D mask
        lets each block see only its own past and its own earlier tokens, so a row's candidates share one copy of
        its keys/values instead of one each.

        Returns the class logits at each block's last token ``[N, L]`` and, with ``keep_cache``, each block's new
        per-layer keys/values ``[H, len(block), D]``.
        """
        logits, new_layers = [], []
        for start in range(0, len(blocks), self.max_blocks):
            chunk = range(start, min(start + self.max_blocks, len(blocks)))
            # 1. Pack: one sequence per row cache (blocks of the same owner are consecutive), one per block without.
            sequences: list[list[int]] = []  # block indices per packed sequence
            for n in chunk:
                if owners[n] is not None and sequences and owners[sequences[-1][0]] is owners[n]:
                    sequences[-1].append(n)
                else:
                    sequences.append([n])
            out, P, offsets = self._packed_forward(sequences, blocks, owners, past_lengths, keep_cache)
            # 2. The head at each block's last token, and each block's new keys/values.
            where = torch.tensor(
                [(r, offsets[n] + len(blocks[n]) - 1) for r, seq in enumerate(sequences) for n in seq],
                device=self.classifier.device,
            )
            hidden = out.last_hidden_state[where[:, 0], where[:, 1]]  # (N, hidden)
            logits.append(self.classifier.score(hidden).float())
            if keep_cache:
                for r, seq in enumerate(sequences):
                    for n in seq:
                        span = slice(P + offsets[n], P + offsets[n] + len(blocks[n]))
                        new_layers.append([(layer.keys[r, :, span], layer.values[r, :, span]) for layer in out.cache.layers])
        return torch.cat(logits), new_layers

    def _packed_forward(self, sequences, blocks, owners, past_lengths, keep_cache):
        """One forward of the classifier's decoder over packed sequences (see :meth:`logits`).

        Returns the decoder output, the padded past length ``P`` and each block's offset in its sequence.
        """
        device, dtype = self.classifier.device, self.classifier.dtype
        R = len(sequences)
        pasts = [len(owners[seq[0]].ids) if owners[seq[0]] is not None else 0 for seq in sequences]
        offsets, query_block, query_past, query_pos = {}, [], [], []
        for r, seq in enumerate(sequences):
            qb, qp, qpos, q = [], [], [], 0
            for n in seq:
                offsets[n] = q
                L, m = past_lengths[n], len(blocks[n])
                qb += [n] * m
                qp += [L] * m
                qpos += list(range(L, L + m))
                q += m
            query_block.append(qb)
            query_past.append(qp)
            query_pos.append(qpos)
        P, Q = max(pasts), max(len(qb) for qb in query_block)

        def padded(rows, fill):  # (R, Q), right-padded
            return torch.tensor([row + [fill] * (Q - len(row)) for row in rows], device=device)

        block_id, past_len, position_ids = padded(query_block, -1), padded(query_past, 0), padded(query_pos, 0)
        input_ids = padded([[t for n in seq for t in blocks[n]] for seq in sequences], self.pad_token_id)
        # 4D mask (R, 1, Q, P + Q). Past key j of row r (left-padded by P - pasts[r]) is visible to a query whose block
        # continues the first L past tokens iff j - (P - pasts[r]) < L; new key k is visible iff same block and k <= q.
        # A padding query sees only itself, so no row of the mask is empty.
        past_index = torch.arange(P, device=device) - (P - torch.tensor(pasts, device=device))[:, None]  # (R, P)
        see_past = (past_index[:, None, :] >= 0) & (past_index[:, None, :] < past_len[:, :, None])  # (R, Q, P)
        q_index = torch.arange(Q, device=device)
        causal = q_index[None, :, None] >= q_index[None, None, :]
        same_block = block_id[:, :, None] == block_id[:, None, :]
        see_new = (same_block & causal & (block_id[:, :, None] >= 0)) | torch.eye(Q, dtype=torch.bool, device=device)
        allowed = torch.cat([see_past, see_new], dim=-1)[:, None]  # (R, 1, Q, P + Q)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        cache = None
        if P > 0:
            like = next(owners[seq[0]] for seq, L in zip(sequences, pasts) if L > 0).layers
            cache = DynamicCache([
                tuple(torch.stack([_left_padded(owners[seq[0]], layer, j, P, like) for seq in sequences]) for j in (0, 1))
                for layer in range(len(like))
            ])  # per layer (R, H, P, D)
        out = self.classifier.base_model(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=cache,
            use_cache=keep_cache or cache is not None,
        )
        return out, P, offsets

    def sync(self, num_rows: int, rows: list[int], prefixes: list[list[int]]) -> None:
        """Bring the caches of ``rows`` (out of ``num_rows``) to their current prefixes: keep the common part, encode
        only the rest."""
        if len(self.row_caches) != num_rows:  # another batch shape: a new generation
            self.row_caches = [RowCache() for _ in range(num_rows)]
        blocks, owners, lengths = [], [], []
        for row, prefix in zip(rows, prefixes):
            cache = self.row_caches[row]
            keep = common_prefix_length(cache.ids, prefix)  # < len(cache.ids) after a new generation or a beam reorder
            cache.crop(keep)
            if keep < len(prefix):
                blocks.append(prefix[keep:])
                owners.append(cache)
                lengths.append(keep)
        if not blocks:
            return
        _, new_layers = self.logits(blocks, owners, lengths, keep_cache=True)
        for cache, block, layers in zip(owners, blocks, new_layers):
            cache.layers = layers if not cache.layers else [
                (torch.cat([k, k_new], dim=1), torch.cat([v, v_new], dim=1))
                for (k, v), (k_new, v_new) in zip(cache.layers, layers)
            ]
            cache.ids = cache.ids + block


__all__ = [
    "PrefixCachedDecoder",
    "RowCache",
    "common_prefix_length",
    "cut_after_last_non_pad",
    "is_decoder_classifier",
    "is_packable_decoder_classifier",
]
