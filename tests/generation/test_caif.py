"""CAIFLogitsProcessor against its plain reference, hand-computed values and its own other paths."""

import copy
import itertools
import json
import math

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, LogitsProcessorList, PreTrainedTokenizerFast

from hf_ext._compat.transformers import attention_implementation
from hf_ext.generation.caif import CAIFLogitsProcessor, _attribute_log_prob, caif_reference_scores
from hf_ext.testing import get_tiny_tokenizer, tiny_corpus, tiny_gpt2, tiny_roberta

PROMPTS = ["the movie was", "this book seemed really", "the food"]  # different lengths: left padding


def _tiny_gpt2_classifier(tokenizer, seed=1, **overrides):
    """A random 2-layer GPT2ForSequenceClassification. No config pad id: the HF head then reads the last token (the
    pad = EOS case has its own test)."""
    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=4, n_positions=128, vocab_size=len(tokenizer), num_labels=2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None, **overrides,
    )
    torch.manual_seed(seed)
    return GPT2ForSequenceClassification(config).eval()


def _bpe_tokenizer():
    """A character-level BPE over the tiny corpus without pre-tokenization: merges cross word boundaries, so
    re-encoding ``prefix + candidate`` can change the prefix's last tokens (the bridge's hard case)."""
    from tokenizers import Tokenizer, models, trainers

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer = trainers.BpeTrainer(vocab_size=90, special_tokens=["<pad>", "<unk>"], show_progress=False)
    backend.train_from_iterator(tiny_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")


def _permuted_tokenizer(tokenizer, seed=0):
    """The same tokenizer with its non-special ids shuffled, and the permutation ``old id -> new id``."""
    from tokenizers import Tokenizer

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    specials = set(tokenizer.all_special_ids)
    movable = sorted(i for i in vocab.values() if i not in specials)
    shuffled = [movable[j] for j in torch.randperm(len(movable), generator=torch.Generator().manual_seed(seed))]
    perm = {i: i for i in specials} | dict(zip(movable, shuffled, strict=True))
    state["model"]["vocab"] = {tok: perm[i] for tok, i in vocab.items()}
    backend = Tokenizer.from_str(json.dumps(state))
    special_tokens = {k: getattr(tokenizer, k) for k in ("pad_token", "bos_token", "eos_token", "unk_token", "mask_token")}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens), perm


@pytest.fixture(scope="module")
def tok():
    return get_tiny_tokenizer(padding_side="left")


@pytest.fixture(scope="module")
def lm(tok):
    return tiny_gpt2(seed=0, tokenizer=tok)


@pytest.fixture(scope="module")
def roberta(tok):
    return tiny_roberta(seed=1, tokenizer=tok)


@pytest.fixture(scope="module")
def gpt2_cls(tok):
    return _tiny_gpt2_classifier(tok)


def _lm_scores(lm, input_ids, attention_mask):
    """Next-token logits of the left-padded batch, as generate computes them."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, -1].float()


def _greedy_steps(lm, tok, prompts, processors, steps):
    """Decode greedily with ``processors[0]``, calling every processor on the same inputs at each step.

    Returns the per-step scores of each processor and the generated ids.
    """
    batch = tok(prompts, return_tensors="pt", padding=True)
    input_ids, mask = batch.input_ids, batch.attention_mask
    history = [[] for _ in processors]
    for _ in range(steps):
        scores = _lm_scores(lm, input_ids, mask)
        outs = [p(input_ids, scores) for p in processors]
        for h, o in zip(history, outs, strict=True):
            h.append(o)
        next_ids = outs[0].argmax(-1, keepdim=True)
        input_ids = torch.cat([input_ids, next_ids], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
    return history, input_ids


def _assert_same_scores(actual, expected, atol=1e-5):
    finite = expected.isfinite()
    assert torch.equal(actual.isfinite(), finite)
    torch.testing.assert_close(actual[finite], expected[finite], atol=atol, rtol=0)


class _Reference:
    """caif_reference_scores with fixed arguments, callable like a processor."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def __call__(self, input_ids, scores):
        return caif_reference_scores(input_ids, scores, **self.kwargs)


# --- the reference: candidate scores and greedy tokens ---------------------------------------------------------------


@pytest.mark.parametrize(
    "classifier_name, use_cache, activation, invert",
    [("roberta", True, "softmax", False), ("gpt2", True, "softmax", False), ("gpt2", False, "sigmoid", True)],
)
def test_matches_reference_over_greedy_steps(tok, lm, roberta, gpt2_cls, classifier_name, use_cache, activation, invert):
    classifier = {"roberta": roberta, "gpt2": gpt2_cls}[classifier_name]
    kwargs = dict(classifier=classifier, classifier_tokenizer=tok, lm_tokenizer=tok, target_label=1, alpha=4.0,
                  top_k=12, activation=activation, invert=invert)
    proc = CAIFLogitsProcessor(**kwargs, use_cache=use_cache)
    (ours, ref), generated = _greedy_steps(lm, tok, PROMPTS, [proc, _Reference(**kwargs)], steps=4)
    for a, r in zip(ours, ref, strict=True):
        _assert_same_scores(a, r)
        assert torch.equal(a.argmax(-1), r.argmax(-1))
    # generate() with the processor picks the same tokens as the step-by-step reference loop.
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    out = lm.generate(**batch, logits_processor=LogitsProcessorList([CAIFLogitsProcessor(**kwargs, use_cache=use_cache)]),
                      do_sample=False, max_new_tokens=4, pad_token_id=tok.pad_token_id)
    assert torch.equal(out, generated)


def test_candidates_get_the_formula_and_the_rest_minus_inf(tok, roberta):
    """Hand check of the rule with a classifier whose class logits are fixed at (2, -1) for any text."""
    classifier = copy.deepcopy(roberta)
    with torch.no_grad():
        classifier.classifier.out_proj.weight.zero_()
        classifier.classifier.out_proj.bias.copy_(torch.tensor([2.0, -1.0]))
    scores = torch.randn(2, len(tok))
    input_ids = tok(["the movie", "the food was"], return_tensors="pt", padding=True).input_ids
    log_p = torch.log_softmax(scores, -1)
    top = log_p.topk(5, dim=-1).indices
    cases = {  # (activation, invert) -> log p_cls(target=0), by hand
        ("softmax", False): 2 - math.log(math.exp(2) + math.exp(-1)),
        ("softmax", True): -1 - math.log(math.exp(2) + math.exp(-1)),
        ("sigmoid", False): -math.log(1 + math.exp(-2)),
        ("sigmoid", True): -math.log(1 + math.exp(2)),
    }
    for (activation, invert), c in cases.items():
        proc = CAIFLogitsProcessor(classifier, tok, tok, 0, alpha=-3.0, top_k=5, activation=activation, invert=invert)
        out = proc(input_ids, scores)
        expected = torch.full_like(scores, float("-inf")).scatter(1, top, log_p.gather(1, top) - 3.0 * c)
        _assert_same_scores(out, expected)


def test_attribute_log_prob_hand_values():
    logits = torch.tensor([[0.5, 1.5, -2.0]])
    p = torch.softmax(logits, -1)[0, 1].item()
    assert _attribute_log_prob(logits, 1, "softmax", False).item() == pytest.approx(math.log(p), abs=1e-6)
    assert _attribute_log_prob(logits, 1, "softmax", True).item() == pytest.approx(math.log(1 - p), abs=1e-6)
    s = 1 / (1 + math.exp(-1.5))
    assert _attribute_log_prob(logits, 1, "sigmoid", False).item() == pytest.approx(math.log(s), abs=1e-6)
    assert _attribute_log_prob(logits, 1, "sigmoid", True).item() == pytest.approx(math.log(1 - s), abs=1e-6)


# --- paths that must agree --------------------------------------------------------------------------------------------


def _tiny_llama_classifier(tokenizer, seed=3):
    """A random 2-layer LlamaForSequenceClassification (rotary positions: the cache must carry them right)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), num_labels=2, pad_token_id=None, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config).eval()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa", "flex_attention"])
def test_packed_forward_only_for_attention_that_takes_a_4d_mask(tok, attn_implementation):
    """The packed candidate forward hands the decoder a custom 4D float mask, which eager and SDPA attention take;
    other implementations (here flex attention) go through the classifier's own forward."""
    classifier = _tiny_llama_classifier(tok)
    classifier.set_attn_implementation(attn_implementation)
    assert attention_implementation(classifier.config) == attn_implementation
    classifier.config.pad_token_id = tok.eos_token_id  # the own-forward path pads with it
    proc = CAIFLogitsProcessor(classifier, tok, tok, target_label=1, alpha=2.0)
    assert proc.is_causal_classifier == proc.use_prefix_cache == (attn_implementation != "flex_attention")


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_prefix_cache_equals_full_reencode_and_resets_between_generations(tok, lm, gpt2_cls, architecture):
    classifier = gpt2_cls if architecture == "gpt2" else _tiny_llama_classifier(tok)
    kwargs = dict(classifier=classifier, classifier_tokenizer=tok, lm_tokenizer=tok, target_label=0, alpha=3.0, top_k=20)
    cached = CAIFLogitsProcessor(**kwargs)
    full = CAIFLogitsProcessor(**kwargs, use_cache=False)
    assert cached.use_prefix_cache and not full.use_prefix_cache
    (a, b, r), _ = _greedy_steps(lm, tok, PROMPTS, [cached, full, _Reference(**kwargs)], steps=5)
    for x, y, z in zip(a, b, r, strict=True):
        _assert_same_scores(x, y)
        _assert_same_scores(x, z)
    # The same processor object reused for new generations (other prompts, then a shorter batch) stays correct.
    for prompts in (["the game felt so", "our trip", "my day was"], ["the show"]):
        (a, b), _ = _greedy_steps(lm, tok, prompts, [cached, CAIFLogitsProcessor(**kwargs, use_cache=False)], steps=3)
        for x, y in zip(a, b, strict=True):
            _assert_same_scores(x, y)


@pytest.mark.parametrize("use_cache", [True, False])
def test_causal_classifier_reads_where_its_head_reads_with_eos_as_pad(tok, use_cache):
    """GPT-2 classifiers set pad = EOS, and their head reads the last non-pad token: an EOS candidate is judged on
    the prefix alone, as the classifier's own forward (the reference) judges it."""
    classifier = _tiny_gpt2_classifier(tok, seed=4)
    classifier.config.pad_token_id = tok.eos_token_id
    kwargs = dict(classifier=classifier, classifier_tokenizer=tok, lm_tokenizer=tok, target_label=1, alpha=4.0, top_k=5)
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    scores = torch.randn(len(PROMPTS), len(tok))
    scores[:, tok.eos_token_id] = 10.0  # EOS is every row's first candidate
    out = CAIFLogitsProcessor(**kwargs, use_cache=use_cache)(batch.input_ids, scores)
    _assert_same_scores(out, caif_reference_scores(batch.input_ids, scores, **kwargs))
    with torch.no_grad():  # by hand: EOS candidate's classifier term == the prefix's own class log-probability
        for i, prompt in enumerate(PROMPTS):
            prefix_logits = classifier(input_ids=tok([prompt], return_tensors="pt").input_ids).logits[0]
            c = torch.log_softmax(prefix_logits, -1)[1]
            expected = torch.log_softmax(scores[i], -1)[tok.eos_token_id] + 4.0 * c
            torch.testing.assert_close(out[i, tok.eos_token_id], expected, atol=1e-5, rtol=0)


def _unpackable_decoder_classifier(tokenizer, kind):
    """Decoders the packed candidate forward cannot serve: MPT takes no position ids (ALiBi from the mask); a
    Mistral whose sliding window (2) is shorter than the texts would see a full-attention 4D mask."""
    from transformers import MistralConfig, MistralForSequenceClassification, MptConfig, MptForSequenceClassification

    torch.manual_seed(5)
    if kind == "mpt":
        config = MptConfig(vocab_size=len(tokenizer), d_model=32, n_layers=2, n_heads=4, num_labels=2, pad_token_id=None)
        return MptForSequenceClassification(config).eval()
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=2, num_labels=2, pad_token_id=None,
    )
    return MistralForSequenceClassification(config).eval()


@pytest.mark.parametrize("kind", ["mpt", "mistral_sliding_window"])
def test_unpackable_decoder_runs_its_own_forward_and_needs_a_config_pad_id(tok, kind):
    """Such a classifier is scored by its own forward, right-padded with its config's pad id (here EOS, not the
    tokenizer's pad), and a config without a pad id is refused up front."""
    classifier = _unpackable_decoder_classifier(tok, kind)
    with pytest.raises(ValueError, match=r"`classifier` \(m.*\).*`classifier.config.pad_token_id`"):
        CAIFLogitsProcessor(classifier, tok, tok, target_label=1, alpha=3.0)
    classifier.config.pad_token_id = tok.eos_token_id
    kwargs = dict(classifier=classifier, classifier_tokenizer=tok, lm_tokenizer=tok, target_label=1, alpha=3.0, top_k=6)
    proc = CAIFLogitsProcessor(**kwargs)
    assert not proc.is_causal_classifier and not proc.use_prefix_cache
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    scores = torch.randn(len(PROMPTS), len(tok))
    scores[:, tok.eos_token_id] = 10.0
    _assert_same_scores(proc(batch.input_ids, scores), caif_reference_scores(batch.input_ids, scores, **kwargs))


def test_prefix_cache_follows_rows_the_entropy_gate_skipped(tok, lm, gpt2_cls):
    """Gated rows skip the cache update; when a later step re-scores them, the cache catches up on several tokens."""
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    log_p = torch.log_softmax(_lm_scores(lm, batch.input_ids, batch.attention_mask), -1)
    threshold = (-(log_p.exp() * log_p).sum(-1)).median().item()  # the first step gates about half the rows
    kwargs = dict(classifier=gpt2_cls, classifier_tokenizer=tok, lm_tokenizer=tok, target_label=1, alpha=3.0, top_k=8,
                  entropy_threshold=threshold)
    (cached, full), _ = _greedy_steps(lm, tok, PROMPTS, [CAIFLogitsProcessor(**kwargs),
                                                         CAIFLogitsProcessor(**kwargs, use_cache=False)], steps=6)
    gated = torch.stack([out.isfinite().all(-1) for out in full])  # (steps, rows): a gated row keeps every token
    assert gated.any() and not gated.all()
    for x, y in zip(cached, full, strict=True):
        _assert_same_scores(x, y)


def test_prefix_cache_encodes_only_each_steps_new_tokens(tok, lm, gpt2_cls):
    """After the first step, a step feeds the decoder one new prefix token per row, then one token per candidate."""
    shapes = []
    hook = gpt2_cls.transformer.register_forward_hook(
        lambda m, args, kwargs, out: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        proc = CAIFLogitsProcessor(gpt2_cls, tok, tok, target_label=1, alpha=2.0, top_k=12)
        _greedy_steps(lm, tok, PROMPTS, [proc], steps=3)
    finally:
        hook.remove()
    prompt_length = max(len(ids) for ids in tok(PROMPTS).input_ids)
    # step 1: the prompts, then 12 one-token candidates packed per row; steps 2-3: 1 token per row, 12 per row
    assert shapes == [(3, prompt_length), (3, 12), (3, 1), (3, 12), (3, 1), (3, 12)]


def test_bridge_with_retokenizing_classifier_tokenizer(tok, lm):
    """LM: word-level tokenizer; classifier: cross-word BPE. Cached, full and reference agree."""
    bpe = _bpe_tokenizer()
    classifier = _tiny_gpt2_classifier(bpe, seed=2)
    kwargs = dict(classifier=classifier, classifier_tokenizer=bpe, lm_tokenizer=tok, target_label=1, alpha=5.0, top_k=10)
    cached = CAIFLogitsProcessor(**kwargs)
    assert not cached.same_tokenizer and cached.use_prefix_cache
    procs = [cached, CAIFLogitsProcessor(**kwargs, use_cache=False), _Reference(**kwargs)]
    (a, b, r), _ = _greedy_steps(lm, tok, PROMPTS[:2], procs, steps=3)
    for x, y, z in zip(a, b, r, strict=True):
        _assert_same_scores(x, z)
        _assert_same_scores(y, z)


def test_bridge_through_text_equals_shared_ids(tok, roberta):
    """A classifier with shuffled token ids (and embeddings shuffled to match) scores text as the original does."""
    shuffled_tok, perm = _permuted_tokenizer(tok)
    shuffled = copy.deepcopy(roberta)
    with torch.no_grad():
        old = roberta.roberta.embeddings.word_embeddings.weight
        new = shuffled.roberta.embeddings.word_embeddings.weight
        new[torch.tensor(list(perm.values()))] = old[torch.tensor(list(perm.keys()))]
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    scores = torch.randn(len(PROMPTS), len(tok))
    scores[:, tok.all_special_ids] = float("-inf")  # special candidates vanish from text, so only words compare
    shared = CAIFLogitsProcessor(roberta, tok, tok, target_label=1, alpha=2.0, top_k=30)
    bridged = CAIFLogitsProcessor(shuffled, shuffled_tok, tok, target_label=1, alpha=2.0, top_k=30)
    assert shared.same_tokenizer and not bridged.same_tokenizer
    _assert_same_scores(bridged(batch.input_ids, scores), shared(batch.input_ids, scores))


@pytest.mark.parametrize("bridged", [False, True])
def test_max_classifier_tokens_matches_reference(tok, roberta, bridged):
    classifier_tok = _permuted_tokenizer(tok)[0] if bridged else tok
    kwargs = dict(classifier=roberta, classifier_tokenizer=classifier_tok, lm_tokenizer=tok, target_label=0, alpha=2.0,
                  top_k=8, max_classifier_tokens=3)
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    scores = torch.randn(len(PROMPTS), len(tok))
    _assert_same_scores(CAIFLogitsProcessor(**kwargs)(batch.input_ids, scores),
                        caif_reference_scores(batch.input_ids, scores, **kwargs))
    # Truncation matters here: without it the scores differ.
    assert not torch.allclose(CAIFLogitsProcessor(**{**kwargs, "max_classifier_tokens": None})(batch.input_ids, scores)
                              .nan_to_num(), caif_reference_scores(batch.input_ids, scores, **kwargs).nan_to_num())


# --- gating, batching, generate() ---------------------------------------------------------------------------------------


def test_entropy_gate_leaves_confident_rows_and_skips_their_classifier_calls(tok, roberta):
    seen = []
    hook = roberta.register_forward_hook(lambda module, args, kwargs, out: seen.append(kwargs["input_ids"].shape[0]),
                                         with_kwargs=True)
    try:
        scores = torch.randn(2, len(tok))
        scores[0, 7] = 30.0  # row 0: almost certain (entropy ~0); row 1: near uniform (entropy ~4.4 nats)
        input_ids = tok(["the movie", "the food was"], return_tensors="pt", padding=True).input_ids
        expected = caif_reference_scores(input_ids, scores, roberta, tok, tok, 1, 2.0, top_k=6, entropy_threshold=1.0)
        seen.clear()
        proc = CAIFLogitsProcessor(roberta, tok, tok, target_label=1, alpha=2.0, top_k=6, entropy_threshold=1.0)
        out = proc(input_ids, scores)
        assert torch.equal(out[0], scores[0])
        _assert_same_scores(out, expected)
        assert sum(seen) == 6  # only row 1's six candidates went through the classifier
        seen.clear()
        everything_gated = CAIFLogitsProcessor(roberta, tok, tok, 1, 2.0, top_k=6, entropy_threshold=100.0)
        assert torch.equal(everything_gated(input_ids, scores), scores) and not seen
    finally:
        hook.remove()


def test_rows_are_independent_batch_vs_one_by_one(tok, lm, gpt2_cls):
    kwargs = dict(classifier=gpt2_cls, classifier_tokenizer=tok, lm_tokenizer=tok, target_label=1, alpha=4.0, top_k=15,
                  classifier_batch_size=7)  # chunks cut across rows
    gen = dict(do_sample=False, max_new_tokens=5, pad_token_id=tok.pad_token_id)
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    together = lm.generate(**batch, logits_processor=LogitsProcessorList([CAIFLogitsProcessor(**kwargs)]), **gen)
    for i, prompt in enumerate(PROMPTS):
        alone = lm.generate(**tok([prompt], return_tensors="pt"),
                            logits_processor=LogitsProcessorList([CAIFLogitsProcessor(**kwargs)]), **gen)
        assert tok.decode(together[i], skip_special_tokens=True) == tok.decode(alone[0], skip_special_tokens=True)
    scores = torch.randn(len(PROMPTS), len(tok))
    batched = CAIFLogitsProcessor(**kwargs)(batch.input_ids, scores)
    for i, prompt in enumerate(PROMPTS):
        single = CAIFLogitsProcessor(**kwargs)(tok([prompt], return_tensors="pt").input_ids, scores[i : i + 1])
        _assert_same_scores(batched[i : i + 1], single)


def test_sampling_with_num_return_sequences_stays_in_the_lm_top_k(tok, lm, roberta):
    proc = CAIFLogitsProcessor(roberta, tok, tok, target_label=1, alpha=3.0, top_k=4)
    batch = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = lm.generate(**batch, logits_processor=LogitsProcessorList([proc]), do_sample=True, top_k=0,
                      num_return_sequences=3, max_new_tokens=4, pad_token_id=tok.pad_token_id)
    assert out.shape == (6, batch.input_ids.shape[1] + 4)
    mask = batch.attention_mask.repeat_interleave(3, dim=0)
    for t in range(batch.input_ids.shape[1], out.shape[1]):
        top4 = _lm_scores(lm, out[:, :t], mask).topk(4, dim=-1).indices
        assert (top4 == out[:, t : t + 1]).any(-1).all()
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)


class _CheckedAgainstReference:
    """Wraps a processor inside generate(): at every step its scores must equal the reference's on the same inputs."""

    def __init__(self, proc, **kwargs):
        self.proc, self.reference, self.inputs = proc, _Reference(**kwargs), []

    def __call__(self, input_ids, scores):
        out = self.proc(input_ids, scores)
        _assert_same_scores(out, self.reference(input_ids, scores))
        self.inputs.append(input_ids.clone())
        return out


@pytest.mark.parametrize(
    "gen, dtype",
    [(dict(num_beams=3, num_return_sequences=2, do_sample=False), torch.float32),
     (dict(do_sample=True, num_return_sequences=3, top_k=0), torch.float64)],
)
def test_generate_modes_match_reference_at_every_step(tok, lm, gpt2_cls, gen, dtype):
    """Beam search reorders rows between steps and num_return_sequences repeats them: the per-row prefix cache
    (content-checked) must still give each row its own prefix's scores, in the classifier's dtype."""
    classifier = copy.deepcopy(gpt2_cls).to(dtype)
    kwargs = dict(classifier=classifier, classifier_tokenizer=tok, lm_tokenizer=tok, target_label=1, alpha=4.0, top_k=6)
    checked = _CheckedAgainstReference(CAIFLogitsProcessor(**kwargs), **kwargs)
    torch.manual_seed(0)
    out = lm.generate(**tok(PROMPTS[:2], return_tensors="pt", padding=True), logits_processor=LogitsProcessorList([checked]),
                      max_new_tokens=5, pad_token_id=tok.pad_token_id, **gen)
    assert out.shape[0] == 2 * gen["num_return_sequences"] and len(checked.inputs) == 5
    reordered = any(not torch.equal(new[:, :-1], old) for old, new in itertools.pairwise(checked.inputs))
    assert reordered == (gen.get("num_beams", 1) > 1)  # beam search did move rows: the cache had to follow


def test_classifier_forwards_are_bounded_by_classifier_batch_size(tok, roberta, gpt2_cls):
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    scores = torch.randn(len(PROMPTS), len(tok))
    for classifier, module in ((roberta, roberta), (gpt2_cls, gpt2_cls.transformer)):
        sizes = []
        hook = module.register_forward_hook(lambda m, args, kwargs, out, sizes=sizes: sizes.append(kwargs["input_ids"].shape[0]),
                                            with_kwargs=True)
        try:
            CAIFLogitsProcessor(classifier, tok, tok, 1, 2.0, top_k=6, classifier_batch_size=4, use_cache=False)(
                batch.input_ids, scores)
        finally:
            hook.remove()
        assert sizes == [4, 4, 4, 4, 2]  # 3 rows x 6 candidates, in forwards of at most 4


def test_positive_alpha_raises_and_negative_alpha_lowers_the_attribute(tok, roberta):
    scores = torch.zeros(1, len(tok))  # a uniform LM: the choice is the classifier's alone
    input_ids = tok(["the movie was"], return_tensors="pt").input_ids
    top = {}
    for alpha in (5.0, -5.0):
        out = CAIFLogitsProcessor(roberta, tok, tok, target_label=1, alpha=alpha, top_k=len(tok))(input_ids, scores)
        token = out.argmax(-1)
        with torch.no_grad():
            top[alpha] = torch.softmax(roberta(input_ids=torch.cat([input_ids, token[:, None]], 1)).logits, -1)[0, 1]
    with torch.no_grad():
        all_p = torch.softmax(roberta(input_ids=torch.cat([input_ids.repeat(len(tok), 1),
                                                           torch.arange(len(tok))[:, None]], 1)).logits, -1)[:, 1]
    torch.testing.assert_close(top[5.0], all_p.max(), atol=1e-6, rtol=0)
    torch.testing.assert_close(top[-5.0], all_p.min(), atol=1e-6, rtol=0)


# --- arguments ----------------------------------------------------------------------------------------------------------


def test_alpha_zero_returns_scores_unchanged(tok, roberta):
    scores = torch.randn(2, len(tok))
    out = CAIFLogitsProcessor(roberta, tok, tok, target_label=1, alpha=0.0)(torch.ones(2, 3, dtype=torch.long), scores)
    assert torch.equal(out, scores)


def test_target_label_by_name(tok):
    classifier = tiny_roberta(seed=1, tokenizer=tok, id2label={0: "NEGATIVE", 1: "POSITIVE"})
    assert CAIFLogitsProcessor(classifier, tok, tok, target_label="POSITIVE", alpha=1.0).target_label == 1


def test_bad_arguments_raise(tok, roberta, gpt2_cls):
    no_pad = copy.deepcopy(tok)
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="`top_k`.*0"):
        CAIFLogitsProcessor(roberta, tok, tok, 1, 1.0, top_k=0)
    with pytest.raises(ValueError, match=r"`target_label` must be in \[0, 1\].*5"):
        CAIFLogitsProcessor(roberta, tok, tok, 5, 1.0)
    with pytest.raises(ValueError, match="`target_label` 'joy'"):
        CAIFLogitsProcessor(roberta, tok, tok, "joy", 1.0)
    with pytest.raises(ValueError, match="`classifier_tokenizer` has no pad token"):
        CAIFLogitsProcessor(roberta, no_pad, tok, 1, 1.0)
    with pytest.raises(ValueError, match="`activation` must be one of.*'relu'"):
        CAIFLogitsProcessor(roberta, tok, tok, 1, 1.0, activation="relu")
    with pytest.raises(ValueError, match="`entropy_threshold`.*-1"):
        CAIFLogitsProcessor(roberta, tok, tok, 1, 1.0, entropy_threshold=-1.0)
    with pytest.raises(ValueError, match="`max_classifier_tokens`=4.*use_cache=False"):
        CAIFLogitsProcessor(gpt2_cls, tok, tok, 1, 1.0, max_classifier_tokens=4)
    with pytest.raises(ValueError, match="`max_classifier_tokens` must be None or an integer >= 1.*0"):
        CAIFLogitsProcessor(roberta, tok, tok, 1, 1.0, max_classifier_tokens=0)
    with pytest.raises(ValueError, match="`classifier_batch_size` must be a positive integer.*0"):
        CAIFLogitsProcessor(roberta, tok, tok, 1, 1.0, classifier_batch_size=0)
    with pytest.raises(TypeError, match="`alpha` must be a float.*'strong'"):
        CAIFLogitsProcessor(roberta, tok, tok, 1, "strong")
