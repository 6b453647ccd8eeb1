"""CAIF sampling: re-weight the LM's top candidates with an external attribute classifier.

"Classifiers are Better Experts for Controllable Text Generation" (Sitdikov, Balagansky, Gavrilov,
Markov; arXiv 2205.07276) samples from

    p(x_t | x_<t, c)  ∝  p_LM(x_t | x_<t) · p_cls(c | x_≤t)^α                     (CAIF rule)

restricted to the LM's top-k candidates. In log space, the score of candidate ``x`` is

    s(x) = log p_LM(x | x_<t) + α · log p_cls(c | x_<t, x)     for x in top-k,    -inf elsewhere.

:class:`CAIFLogitsProcessor` implements this step for ``generate()``; :func:`caif_reference_scores`
is the same step written plainly (one classifier call per candidate) and is the spec the tests hold
the processor to.

Relation to the official demo (HF Space ``tinkoff-ai/caif``): the demo scores
``[(ℓ - mean ℓ) + α·(c - mean c)] / T`` over the top 100 candidates and samples among the best 20.
Subtracting per-row means shifts every candidate of a row by the same constant, so the softmax over
the candidates, and hence greedy and sampled tokens, are those of the formula above; temperature and
"best 20" are ``generate(temperature=T, top_k=20)``, which run after this processor.
"""

import copy

import torch
from torch import nn
from transformers import LogitsProcessor
from transformers.generation.logits_process import LOGITS_PROCESSOR_INPUTS_DOCSTRING
from transformers.utils import add_start_docstrings, logging

from hf_ext.generation.caif_decoder import (
    PrefixCachedDecoder,
    common_prefix_length,
    cut_after_last_non_pad,
    is_decoder_classifier,
    is_packable_decoder_classifier,
)

logger = logging.get_logger(__name__)

_ACTIVATIONS = ("softmax", "sigmoid")


# ---------------------------------------------------------------------------------------------------------------------
# Small pure helpers
# ---------------------------------------------------------------------------------------------------------------------


def _resolve_target_label(config, target_label: int | str) -> int:
    """The class index of ``target_label`` (an index, or a name from ``config.id2label``)."""
    num_labels = config.num_labels
    if isinstance(target_label, bool) or not isinstance(target_label, (int, str)):
        raise TypeError(f"`target_label` must be an int or a label name, got {type(target_label).__name__}.")
    if isinstance(target_label, str):
        label2id = {name: int(i) for i, name in (config.id2label or {}).items()}  # config.label2id may be unset
        if target_label not in label2id:
            raise ValueError(f"`target_label` {target_label!r} is not one of the classifier's labels {sorted(label2id)}.")
        return label2id[target_label]
    if not 0 <= target_label < num_labels:
        raise ValueError(f"`target_label` must be in [0, {num_labels - 1}] for this classifier, got {target_label}.")
    return target_label


def _same_tokenizer(lm_tokenizer, classifier_tokenizer) -> bool:
    """Whether token ids of one tokenizer mean the same tokens in the other (then no text round trip is needed)."""
    return lm_tokenizer is classifier_tokenizer or lm_tokenizer.get_vocab() == classifier_tokenizer.get_vocab()


def _strip_left_padding(ids: list[int], pad_token_id: int | None) -> list[int]:
    """Drop the leading run of ``pad_token_id`` (the left padding ``generate`` keeps in ``input_ids``)."""
    start = 0
    if pad_token_id is not None:
        while start < len(ids) and ids[start] == pad_token_id:
            start += 1
    return ids[start:]


def _check_max_classifier_tokens(max_classifier_tokens, classifier_tokenizer, use_prefix_cache: bool) -> None:
    min_tokens = 1 + classifier_tokenizer.num_special_tokens_to_add()
    if isinstance(max_classifier_tokens, bool) or not isinstance(max_classifier_tokens, int) or (
        max_classifier_tokens < min_tokens
    ):
        raise ValueError(
            f"`max_classifier_tokens` must be None or an integer >= {min_tokens} (one token plus the "
            f"classifier tokenizer's special tokens), got {max_classifier_tokens!r}."
        )
    if use_prefix_cache:
        raise ValueError(
            f"`max_classifier_tokens`={max_classifier_tokens} truncates the start of the text, which the prefix "
            "cache of a causal classifier cannot do; pass `use_cache=False` to truncate."
        )


def _sequence_pad_token_id(classifier, classifier_tokenizer, packable: bool) -> int:
    """The id that right-pads whole sequences for the classifier's own forward.

    A decoder's own head reads the last token that is not its config's pad id, so padding must use that id (e.g. EOS
    for GPT-2 classifiers, whatever the tokenizer's pad token is).
    """
    if not is_decoder_classifier(classifier) or packable:
        return classifier_tokenizer.pad_token_id
    pad_token_id = classifier.config.get_text_config().pad_token_id
    if pad_token_id is None:
        raise ValueError(
            f"`classifier` ({classifier.config.model_type}) is run through its own forward on padded batches, "
            "where its head finds each sequence's last token by `classifier.config.pad_token_id`, which is "
            "None; set it, e.g. `classifier.config.pad_token_id = classifier_tokenizer.pad_token_id`."
        )
    return pad_token_id


def _attribute_log_prob(logits: torch.Tensor, target: int, activation: str, invert: bool) -> torch.Tensor:
    """log p_cls(target) (or log(1 - p) with ``invert``) from class logits ``[N, L]``, in a stable form."""
    logits = logits.float()
    if activation == "sigmoid":  # one independent probability per label (multi-label heads)
        return nn.functional.logsigmoid(-logits[:, target] if invert else logits[:, target])
    log_norm = torch.logsumexp(logits, dim=-1)
    if not invert:
        return logits[:, target] - log_norm
    others = logits.clone()
    others[:, target] = float("-inf")
    return torch.logsumexp(others, dim=-1) - log_norm  # log(1 - p) = log(sum of the other classes' mass)


# ---------------------------------------------------------------------------------------------------------------------
# The processor
# ---------------------------------------------------------------------------------------------------------------------


class CAIFLogitsProcessor(LogitsProcessor):
    r"""
    [`LogitsProcessor`] for CAIF sampling: the LM's `top_k` candidates are re-scored with an external sequence
    classifier and every other token is removed.

    See [the paper](https://huggingface.co/papers/2205.07276). For each row, with ℓ = log_softmax(scores):

        new_score(x) = ℓ(x) + alpha * log p_cls(target_label | prefix + x)   for the top_k tokens x by ℓ,
        new_score(x) = -inf                                                  otherwise.

    The classifier may use its own tokenizer: the prefix and each candidate are decoded with `lm_tokenizer`
    (special tokens skipped) and re-encoded with `classifier_tokenizer`. When both tokenizers have the same
    vocabulary the LM's ids (left padding removed) are fed to the classifier directly. All candidates of all rows
    are scored in batched classifier forwards of at most `classifier_batch_size` sequences, on the classifier's
    own device and dtype.

    For a causal classifier (a `score` head over a decoder, e.g. `GPT2ForSequenceClassification` or
    `LlamaForSequenceClassification`) each row's prefix keys/values are cached, so a step encodes only the
    candidates' new tokens; its class logits are read where its own head reads them (the last token that is not
    `classifier.config.pad_token_id`). The cache is checked against each row's prefix at every call, so a new
    `generate()` call, beam search reordering rows or a changed batch only re-encode what changed. ALiBi decoders
    (Bloom, MPT, Falcon with `alibi`) cannot be packed this way; they run through their own forward on right-padded
    batches, which needs `classifier.config.pad_token_id`; so do decoders with sliding-window layers.

    The rule of the official demo, `[(ℓ - mean ℓ) + alpha·(c - mean c)] / T` sampled among its best 20, differs
    from this one by a per-row constant: use `generate(temperature=T, top_k=20)` to reproduce it.

    Args:
        classifier (`PreTrainedModel`):
            A sequence classifier (`...ForSequenceClassification`), in eval mode.
        classifier_tokenizer (`PreTrainedTokenizerBase`):
            The classifier's tokenizer. It must have a pad token (candidates are padded into batches).
        lm_tokenizer (`PreTrainedTokenizerBase`):
            The LM's tokenizer; its `pad_token_id` marks the left padding of `input_ids` (processors get no
            attention mask, so a prompt that itself starts with that token, e.g. GPT-2's EOS used as pad, loses it).
        target_label (`int` or `str`):
            The attribute `c`: a class index or a name from `classifier.config.id2label`.
        alpha (`float`):
            Strength α of the classifier (the CAIF rule's exponent). Negative values steer away from the attribute.
            `alpha == 0` returns the scores unchanged (plain decoding, no `top_k` cut).
        top_k (`int`, *optional*, defaults to 100):
            Number of the LM's most likely tokens re-scored per row; candidates the LM already gives -inf are
            dropped without a classifier call.
        entropy_threshold (`float`, *optional*):
            Rows whose next-token entropy (nats) is below this are returned as the LM gave them and cost no
            classifier call. `None` re-scores every row.
        activation (`str`, *optional*, defaults to `"softmax"`):
            `"softmax"` over the classes, or `"sigmoid"` per label for multi-label heads (e.g. toxicity).
        invert (`bool`, *optional*, defaults to `False`):
            Use log(1 - p_cls(target)) instead of log p_cls(target).
        max_classifier_tokens (`int`, *optional*):
            Keep only the last this many classifier tokens of each sequence (special tokens included; left
            truncation). Not available with the prefix cache of a causal classifier (`use_cache=True`).
        classifier_batch_size (`int`, *optional*, defaults to 256):
            Most sequences per classifier forward.
        use_cache (`bool`, *optional*, defaults to `True`):
            Reuse a prefix cache for causal classifiers (see above). With `False` (and for other classifiers) every
            candidate sequence is encoded in full.

    Examples:

    ```python
    >>> import torch
    >>> from transformers import LogitsProcessorList
    >>> from hf_ext import CAIFLogitsProcessor
    >>> from hf_ext.testing import get_tiny_tokenizer, tiny_gpt2, tiny_roberta

    >>> tokenizer = get_tiny_tokenizer(padding_side="left")
    >>> lm, classifier = tiny_gpt2(), tiny_roberta()
    >>> caif = CAIFLogitsProcessor(classifier, tokenizer, tokenizer, target_label=1, alpha=5.0, top_k=10)
    >>> inputs = tokenizer(["the movie was", "the food"], return_tensors="pt", padding=True)
    >>> out = lm.generate(**inputs, logits_processor=LogitsProcessorList([caif]), do_sample=False, max_new_tokens=4)
    >>> out.shape
    torch.Size([2, 7])

    ```
    """

    def __init__(
        self,
        classifier,
        classifier_tokenizer,
        lm_tokenizer,
        target_label: int | str,
        alpha: float,
        top_k: int = 100,
        entropy_threshold: float | None = None,
        activation: str = "softmax",
        invert: bool = False,
        max_classifier_tokens: int | None = None,
        classifier_batch_size: int = 256,
        use_cache: bool = True,
    ):
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"`top_k` has to be a strictly positive integer, but is {top_k!r}.")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"`alpha` must be a float, got {alpha!r}.")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"`activation` must be one of {_ACTIVATIONS}, got {activation!r}.")
        if entropy_threshold is not None and not entropy_threshold >= 0:
            raise ValueError(f"`entropy_threshold` must be None or >= 0, got {entropy_threshold!r}.")
        if classifier_batch_size is None or isinstance(classifier_batch_size, bool) or classifier_batch_size < 1:
            raise ValueError(f"`classifier_batch_size` must be a positive integer, got {classifier_batch_size!r}.")
        if classifier_tokenizer.pad_token_id is None:
            raise ValueError(
                "`classifier_tokenizer` has no pad token, which batching the candidates needs; set one, e.g. "
                "`classifier_tokenizer.pad_token = classifier_tokenizer.eos_token`."
            )
        self.target_label = _resolve_target_label(classifier.config, target_label)
        self.is_causal_classifier = is_packable_decoder_classifier(classifier)
        self.use_prefix_cache = self.is_causal_classifier and use_cache
        if max_classifier_tokens is not None:
            _check_max_classifier_tokens(max_classifier_tokens, classifier_tokenizer, self.use_prefix_cache)
        if classifier.training:
            logger.warning("The CAIF classifier is in training mode (dropout on); call `classifier.eval()`.")

        self.classifier = classifier
        self.lm_tokenizer = lm_tokenizer
        self.alpha = float(alpha)
        self.top_k = top_k
        self.entropy_threshold = entropy_threshold
        self.activation = activation
        self.invert = invert
        self.max_classifier_tokens = max_classifier_tokens
        self.classifier_batch_size = classifier_batch_size
        self.same_tokenizer = _same_tokenizer(lm_tokenizer, classifier_tokenizer)
        if max_classifier_tokens is not None and not self.same_tokenizer:
            # Left truncation keeps the end of the text and the tokenizer's own special tokens; a private copy
            # avoids changing the caller's tokenizer.
            classifier_tokenizer = copy.deepcopy(classifier_tokenizer)
            classifier_tokenizer.truncation_side = "left"
        self.classifier_tokenizer = classifier_tokenizer
        self._classifier_pad_token_id = classifier.config.get_text_config().pad_token_id
        self._sequence_pad_token_id = _sequence_pad_token_id(classifier, classifier_tokenizer, self.is_causal_classifier)
        self._decoder = (
            PrefixCachedDecoder(classifier, classifier_tokenizer.pad_token_id, classifier_batch_size)
            if self.is_causal_classifier
            else None
        )

    # --- classifier inputs ------------------------------------------------------------------------------------------

    def _encode_texts(self, sequences: list[list[int]], truncate: bool) -> list[list[int]]:
        """LM token ids -> text -> classifier token ids (the tokenizer bridge)."""
        texts = self.lm_tokenizer.batch_decode(sequences, skip_special_tokens=True)
        truncation = truncate and self.max_classifier_tokens is not None
        encoded = self.classifier_tokenizer(texts, truncation=truncation, max_length=self.max_classifier_tokens)
        return encoded["input_ids"]

    def _candidate_sequences(self, prefix: list[int], candidates: list[int]) -> list[list[int]]:
        """Classifier ids of ``prefix + [x]`` for every candidate ``x`` of one row."""
        sequences = [prefix + [x] for x in candidates]
        if not self.same_tokenizer:
            return self._encode_texts(sequences, truncate=True)
        if self.max_classifier_tokens is not None:
            return [s[-self.max_classifier_tokens :] for s in sequences]
        return sequences

    def _prefix_sequence(self, prefix: list[int]) -> list[int]:
        """Classifier ids of the prefix alone (what the prefix cache holds)."""
        return prefix if self.same_tokenizer else self._encode_texts([prefix], truncate=False)[0]

    # --- classifier forwards ----------------------------------------------------------------------------------------

    def _sequence_logits(self, sequences: list[list[int]]) -> torch.Tensor:
        """Class logits ``[N, L]`` of whole sequences through the classifier's own forward and head, right-padded, in
        chunks of ``classifier_batch_size`` (bidirectional classifiers, and decoders that cannot be packed)."""
        device, pad_id = self.classifier.device, self._sequence_pad_token_id
        outputs = []
        for start in range(0, len(sequences), self.classifier_batch_size):
            chunk = sequences[start : start + self.classifier_batch_size]
            lengths = torch.tensor([len(s) for s in chunk], device=device)
            input_ids = torch.full((len(chunk), int(lengths.max())), pad_id, dtype=torch.long, device=device)
            for i, s in enumerate(chunk):
                input_ids[i, : len(s)] = torch.tensor(s, device=device)
            attention_mask = (torch.arange(input_ids.shape[1], device=device) < lengths[:, None]).long()
            outputs.append(self.classifier(input_ids=input_ids, attention_mask=attention_mask).logits.float())
        return torch.cat(outputs)

    def _classifier_log_probs(
        self, batch_size: int, rows: list[int], prefixes: list[list[int]], candidates: list[list[int]]
    ) -> torch.Tensor:
        """log p_cls(target | prefix + x) for every candidate ``x`` of every row, as one flat tensor."""
        sequences, owners, lengths = [], [], []
        if self.use_prefix_cache:
            prefix_ids = [self._prefix_sequence(p) for p in prefixes]
            self._decoder.sync(batch_size, rows, prefix_ids)
        for i, (row, prefix, cands) in enumerate(zip(rows, prefixes, candidates, strict=True)):
            row_sequences = self._candidate_sequences(prefix, cands)
            if self.is_causal_classifier:  # read where the classifier's own head reads (see cut_after_last_non_pad)
                row_sequences = [cut_after_last_non_pad(s, self._classifier_pad_token_id) for s in row_sequences]
            sequences.extend(row_sequences)
            if self.use_prefix_cache:
                for s in row_sequences:  # reuse the cached prefix up to the first differing token, keep >= 1 new token
                    owners.append(self._decoder.row_caches[row])
                    shared = len(prefix_ids[i]) if self.same_tokenizer else common_prefix_length(prefix_ids[i], s)
                    lengths.append(min(shared, len(s) - 1))
        log_probs = torch.zeros(len(sequences))
        scored = [n for n, s in enumerate(sequences) if s]  # an empty text has nothing to judge: no re-weighting
        if not scored:
            return log_probs
        if self.use_prefix_cache:
            blocks = [sequences[n][lengths[n] :] for n in scored]
            logits, _ = self._decoder.logits(blocks, [owners[n] for n in scored], [lengths[n] for n in scored])
        elif self.is_causal_classifier:
            logits, _ = self._decoder.logits([sequences[n] for n in scored], [None] * len(scored), [0] * len(scored))
        else:
            logits = self._sequence_logits([sequences[n] for n in scored])
        log_probs[scored] = _attribute_log_prob(logits, self.target_label, self.activation, self.invert).cpu()
        return log_probs

    # --- the step ---------------------------------------------------------------------------------------------------

    @add_start_docstrings(LOGITS_PROCESSOR_INPUTS_DOCSTRING)
    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self.alpha == 0:
            return scores
        B, V = scores.shape
        # 1. LM log-probabilities and the entropy gate.
        log_probs = nn.functional.log_softmax(scores.float(), dim=-1)  # (B, V)
        active = torch.ones(B, dtype=torch.bool, device=scores.device)
        if self.entropy_threshold is not None:
            entropy = -(log_probs.exp() * log_probs).nan_to_num().sum(-1)  # -inf logits give 0 * -inf = nan -> 0
            active = entropy >= self.entropy_threshold
        rows = active.nonzero().flatten().tolist()
        if not rows:
            return scores
        # 2. The top_k candidates of the active rows; tokens the LM already removed are not scored.
        values, indices = log_probs[rows].topk(min(self.top_k, V), dim=-1)  # (A, k)
        finite = values.isfinite()
        candidates = [idx[ok].tolist() for idx, ok in zip(indices, finite, strict=True)]
        pad_id = self.lm_tokenizer.pad_token_id
        prefixes = [_strip_left_padding(input_ids[r].tolist(), pad_id) for r in rows]
        # 3. Classifier log-probabilities of every (row, candidate).
        flat = self._classifier_log_probs(B, rows, prefixes, candidates).to(scores.device)
        cls_log_probs = torch.zeros_like(values)
        cls_log_probs[finite] = flat
        # 4. CAIF scores on the candidates, -inf elsewhere; gated rows keep the LM's scores.
        new_values = torch.where(finite, values + self.alpha * cls_log_probs, float("-inf"))
        rescored = torch.full_like(log_probs[rows], float("-inf")).scatter(1, indices, new_values)
        processed = scores.clone()
        processed[rows] = rescored.to(scores.dtype)
        return processed


# ---------------------------------------------------------------------------------------------------------------------
# Plain reference (the spec)
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def caif_reference_scores(
    input_ids: torch.LongTensor,
    scores: torch.Tensor,
    classifier,
    classifier_tokenizer,
    lm_tokenizer,
    target_label: int | str,
    alpha: float,
    top_k: int = 100,
    entropy_threshold: float | None = None,
    activation: str = "softmax",
    invert: bool = False,
    max_classifier_tokens: int | None = None,
) -> torch.Tensor:
    """One CAIF step written plainly: each candidate sequence goes through the classifier alone.

    Same arguments and result as :class:`CAIFLogitsProcessor` (see its docstring for the rule); slow, for tests.
    """
    if alpha == 0:
        return scores
    target = _resolve_target_label(classifier.config, target_label)
    same = _same_tokenizer(lm_tokenizer, classifier_tokenizer)
    if max_classifier_tokens is not None and not same:
        classifier_tokenizer = copy.deepcopy(classifier_tokenizer)
        classifier_tokenizer.truncation_side = "left"
    out = scores.clone()
    for b in range(scores.shape[0]):
        log_probs = torch.log_softmax(scores[b].double(), dim=-1)
        entropy = -sum(p * lp for p, lp in zip(log_probs.exp().tolist(), log_probs.tolist(), strict=True) if p > 0)
        if entropy_threshold is not None and entropy < entropy_threshold:
            continue
        prefix = _strip_left_padding(input_ids[b].tolist(), lm_tokenizer.pad_token_id)
        new_row = torch.full_like(log_probs, float("-inf"))
        values, tokens = log_probs.topk(min(top_k, scores.shape[-1]))
        for value, token in zip(values.tolist(), tokens.tolist(), strict=True):
            if value == float("-inf"):
                continue
            ids = prefix + [token]
            if same:
                cls_ids = ids[-max_classifier_tokens:] if max_classifier_tokens else ids
            else:
                text = lm_tokenizer.decode(ids, skip_special_tokens=True)
                cls_ids = classifier_tokenizer(
                    text, truncation=max_classifier_tokens is not None, max_length=max_classifier_tokens
                )["input_ids"]
            c = 0.0
            if cls_ids:
                logits = classifier(input_ids=torch.tensor([cls_ids], device=classifier.device)).logits[0].double()
                p = torch.sigmoid(logits[target]) if activation == "sigmoid" else torch.softmax(logits, -1)[target]
                c = torch.log(1 - p if invert else p).item()
            new_row[token] = value + alpha * c
        out[b] = new_row.to(scores.dtype)
    return out


__all__ = ["CAIFLogitsProcessor", "caif_reference_scores"]
