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

from hf_ext._compat.transformers import attention_implementation


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
        and attention_implementation(config) in ("sdpa", "eager")
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
    """Keys/values of one row's classifier prefix: ``ids`` and per layer ``(keys, values)`` of shape
    ``[num_heads, len(ids), head_dim]``."""

    def __init__(self):
        self.ids: list[int] = []
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def crop(self, length: int) -> None:
        self.ids = self.ids[:length]
        self.layers = [(keys[:, :length], values[:, :length]) for keys, values in self.layers]


def _left_padded_past(
    row_cache: "RowCache | None", layer: int, width: int, template: list[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A row cache's keys and values of ``layer``, left-padded with zeros to ``width`` positions
    ``[num_heads, width, head_dim]``; all zeros (masked out) for a block without a past, shaped like ``template``."""
    if row_cache is None or not row_cache.ids:
        template_keys, template_values = template[layer]
        return tuple(t.new_zeros(t.shape[0], width, t.shape[2]) for t in (template_keys, template_values))
    keys, values = row_cache.layers[layer]  # (H, len(ids), D)
    padding = (0, 0, width - keys.shape[1], 0)
    return nn.functional.pad(keys, padding), nn.functional.pad(values, padding)


def _cache_keys_values(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(keys, values)`` ``[batch, num_heads, length, head_dim]`` of a ``DynamicCache``, read through its
    public iteration (each item starts with a layer's keys and values, as ``DynamicCache(ddp_cache_data)`` takes them
    back)."""
    return [(layer[0], layer[1]) for layer in cache]


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

        Returns the class logits at each block's last token ``[N, num_labels]`` and, with ``keep_cache``, each
        block's new per-layer keys/values ``[num_heads, len(block), head_dim]``.
        """
        logits, new_layers = [], []
        for start in range(0, len(blocks), self.max_blocks):
            chunk = range(start, min(start + self.max_blocks, len(blocks)))
            # 1. Pack: one sequence per row cache (blocks of the same owner are consecutive), one per block without.
            packs: list[list[int]] = []  # block indices per packed sequence
            for n in chunk:
                if owners[n] is not None and packs and owners[packs[-1][0]] is owners[n]:
                    packs[-1].append(n)
                else:
                    packs.append([n])
            out, past_width, block_offsets = self._packed_forward(packs, blocks, owners, past_lengths, keep_cache)
            # 2. The head at each block's last token, and each block's new keys/values.
            last_token = torch.tensor(
                [(p, block_offsets[n] + len(blocks[n]) - 1) for p, pack in enumerate(packs) for n in pack],
                device=self.classifier.device,
            )  # (blocks in chunk, 2): packed sequence, position
            hidden = out.last_hidden_state[last_token[:, 0], last_token[:, 1]]  # (blocks in chunk, hidden)
            logits.append(self.classifier.score(hidden).float())
            if keep_cache:
                layers = _cache_keys_values(out.cache)  # per layer (packs, H, past_width + query_width, D)
                for p, pack in enumerate(packs):
                    for n in pack:
                        span = slice(past_width + block_offsets[n], past_width + block_offsets[n] + len(blocks[n]))
                        new_layers.append([(keys[p, :, span], values[p, :, span]) for keys, values in layers])
        return torch.cat(logits), new_layers

    def _packed_forward(self, packs, blocks, owners, past_lengths, keep_cache):
        """One forward of the classifier's decoder over packed sequences (see :meth:`logits`).

        Returns the decoder output, the padded past width (the longest row cache among the packs) and each block's
        offset in its packed sequence.
        """
        device, dtype = self.classifier.device, self.classifier.dtype
        pack_pasts = [len(owners[pack[0]].ids) if owners[pack[0]] is not None else 0 for pack in packs]
        # Per packed sequence and query token: its block, how many past tokens it may see, its position id.
        block_offsets, query_block, query_visible_past, query_position = {}, [], [], []
        for pack in packs:
            pack_block, pack_visible_past, pack_position = [], [], []
            for n in pack:
                block_offsets[n] = len(pack_block)
                past_length, block_length = past_lengths[n], len(blocks[n])
                pack_block += [n] * block_length
                pack_visible_past += [past_length] * block_length
                pack_position += list(range(past_length, past_length + block_length))
            query_block.append(pack_block)
            query_visible_past.append(pack_visible_past)
            query_position.append(pack_position)
        past_width, query_width = max(pack_pasts), max(len(pack_block) for pack_block in query_block)

        def right_padded(rows, fill):  # (packs, query_width)
            return torch.tensor([row + [fill] * (query_width - len(row)) for row in rows], device=device)

        block_id = right_padded(query_block, -1)
        visible_past = right_padded(query_visible_past, 0)
        position_ids = right_padded(query_position, 0)
        input_ids = right_padded([[t for n in pack for t in blocks[n]] for pack in packs], self.pad_token_id)
        # 4D mask (packs, 1, query_width, past_width + query_width). Past key j of pack p (left-padded by
        # past_width - pack_pasts[p]) is visible to a query whose block continues the first L past tokens iff
        # j - (past_width - pack_pasts[p]) < L; new key k is visible iff same block and k <= q. A padding query
        # sees only itself, so no row of the mask is empty.
        past_index = torch.arange(past_width, device=device) - (
            past_width - torch.tensor(pack_pasts, device=device)
        )[:, None]  # (packs, past_width)
        see_past = (past_index[:, None, :] >= 0) & (past_index[:, None, :] < visible_past[:, :, None])
        query_index = torch.arange(query_width, device=device)
        causal = query_index[None, :, None] >= query_index[None, None, :]
        same_block = block_id[:, :, None] == block_id[:, None, :]
        see_new = (same_block & causal & (block_id[:, :, None] >= 0)) | torch.eye(
            query_width, dtype=torch.bool, device=device
        )
        allowed = torch.cat([see_past, see_new], dim=-1)[:, None]  # (packs, 1, query_width, past_width + query_width)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        cache = None
        if past_width > 0:
            template = next(owners[pack[0]] for pack, past in zip(packs, pack_pasts, strict=True) if past > 0).layers
            cache = DynamicCache([
                tuple(torch.stack(tensors) for tensors in zip(*(
                    _left_padded_past(owners[pack[0]], layer, past_width, template) for pack in packs
                ), strict=True))
                for layer in range(len(template))
            ])  # per layer (keys, values), each (packs, H, past_width, D)
        out = self.classifier.base_model(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=cache,
            use_cache=keep_cache or cache is not None,
        )
        return out, past_width, block_offsets

    def sync(self, num_rows: int, rows: list[int], prefixes: list[list[int]]) -> None:
        """Bring the caches of ``rows`` (out of ``num_rows``) to their current prefixes: keep the common part, encode
        only the rest."""
        if len(self.row_caches) != num_rows:  # another batch shape: a new generation
            self.row_caches = [RowCache() for _ in range(num_rows)]
        blocks, owners, lengths = [], [], []
        for row, prefix in zip(rows, prefixes, strict=True):
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
        for cache, block, layers in zip(owners, blocks, new_layers, strict=True):
            cache.layers = layers if not cache.layers else [
                (torch.cat([keys, new_keys], dim=1), torch.cat([values, new_values], dim=1))
                for (keys, values), (new_keys, new_values) in zip(cache.layers, layers, strict=True)
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
