"""Tiny offline pieces for tests, the demo and the ``--tiny`` mode of the examples.

Nothing here touches the network: the tokenizer is built in code over a small built-in corpus, the
models are random tiny configs, and Hub loading is exercised through a local folder laid out as the
Hub cache lays out a repository (``models--org--name/snapshots/<commit>/``).
"""

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
from functools import partial
from pathlib import Path

import torch

from hf_ext.data.sentiment import ADVERBS, NEGATIVE, POSITIVE, SUBJECTS, TAILS, VERBS, sentiment_sentence

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "mask_token": "<mask>"}

_FILLER = ["a", "an", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "cat", "dog", "bird",
           "red", "blue", "green", "big", "small", "old", "new", "we", "they", "you", "she", "he", "it", "of", "in", "on",
           "with", "for", "by", "to", "yes", "no", "what", "where", "when", "why", "how", "user", "assistant", "system"]


def tiny_corpus() -> list[str]:
    """The built-in corpus: 800 deterministic sentences of :mod:`hf_ext.data.sentiment`, alternating positive and negative."""
    rng = random.Random(0)
    return [sentiment_sentence(rng, label=i % 2) for i in range(800)]


_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ bos_token }}{{ message['role'] }} : {{ message['content'] }} {{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ bos_token }}assistant :{% endif %}"
)


def get_tiny_tokenizer(padding_side: str = "right"):
    """A word-level fast tokenizer over the built-in corpus, built in code.

    It has pad/bos/eos/unk/mask tokens (ids 0-4), a chat template, adds no special tokens on its
    own, and splits on white space and punctuation. The vocabulary is the corpus' words, the
    digits and the filler words (about 140 tokens).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = list(SPECIAL_TOKENS.values())
    pieces = SUBJECTS + POSITIVE + NEGATIVE + VERBS + ADVERBS + TAILS
    words = sorted({w for p in pieces for w in p.split()} | set(_FILLER) | set("0123456789,.!?:;'\"-()"))
    vocab = {tok: i for i, tok in enumerate(specials + [w for w in words if w not in specials])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return _fast_tokenizer(backend, padding_side)


def get_tiny_bpe_tokenizer(padding_side: str = "right"):
    """A byte-level BPE fast tokenizer (the kind GPT-2, Llama 3 and Qwen ship) trained in code on the built-in corpus.

    Unlike :func:`get_tiny_tokenizer` it encodes any text (byte-level: nothing becomes ``<unk>``), and transformers
    loads it faithfully under the tokenizer classes of those families (``Qwen2Tokenizer`` rebuilds a byte-level BPE
    from a saved vocabulary and merges). Same special tokens (ids 0-4) and chat template; about 510 tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=list(SPECIAL_TOKENS.values()), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(tiny_corpus() + _FILLER, trainer)
    return _fast_tokenizer(backend, padding_side)


def _fast_tokenizer(backend, padding_side: str):
    """The transformers tokenizer around a `tokenizers` backend, with the special tokens and the chat template."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, padding_side=padding_side, **SPECIAL_TOKENS)
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def _tiny_common(tokenizer=None) -> dict:
    tokenizer = tokenizer or get_tiny_tokenizer()
    return dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _tiny_config(config_cls, sizes: dict, tokenizer, overrides: dict):
    """``config_cls`` with the tiny ``sizes`` and the tokenizer's ids; ``overrides`` win over both."""
    return config_cls(**{**sizes, **_tiny_common(tokenizer), **overrides})


def tiny_gpt2(seed: int = 0, tokenizer=None, **overrides):
    """A random 2-layer GPT-2 (hidden 32, 4 heads) for causal LM tests."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = _tiny_config(GPT2Config, dict(n_embd=32, n_layer=2, n_head=4, n_positions=128), tokenizer, overrides)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0, tokenizer=None, **overrides):
    """A random 2-layer Llama (hidden 32, 4 heads, 2 KV heads) for causal LM tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=128)
    config = _tiny_config(LlamaConfig, sizes, tokenizer, overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


# Sizes of `tiny_causal_lm` beyond its common ones (hidden 16, 2 layers, 4 heads, 2 KV heads, head_dim 4):
# the fields each architecture sizes differently (experts, layer patterns, state-space heads).
_TINY_CAUSAL_LM_SIZES = {
    "cohere2": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=16),
    "glm4_moe": dict(moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
                     n_group=1, topk_group=1),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"],
                    sliding_window=16, max_position_embeddings=4096),  # its YaRN rope expects 4096 positions
    "qwen3_moe": dict(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2),
    "nemotron_h": dict(hybrid_override_pattern="M*", mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=1,
                       mamba_d_conv=4, chunk_size=16),
    "lfm2": dict(layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False, conv_L_cache=3),
    "olmo3": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=16),
}


def tiny_causal_lm(model_type: str, seed: int = 0, tokenizer=None, **overrides):
    """A random 2-layer causal LM of any transformers architecture (hidden 16, 4 heads), for tests of code that
    must work across architectures (MoE experts, hybrid attention/convolution/state-space layers).

    ``model_type`` is the config's (``"qwen2"``, ``"gpt_oss"``, ``"qwen3_moe"``, ``"lfm2"``, ...); architectures
    with experts or layer patterns get the small sizes in ``_TINY_CAUSAL_LM_SIZES``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=4, max_position_embeddings=128)
    sizes.update(_TINY_CAUSAL_LM_SIZES.get(model_type, {}))
    config = _tiny_config(partial(AutoConfig.for_model, model_type), sizes, tokenizer, overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_roberta(seed: int = 0, tokenizer=None, num_labels: int = 2, **overrides):
    """A random 2-layer RoBERTa (hidden 32, 4 heads) with a sequence-classification head."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=130, num_labels=num_labels)
    config = _tiny_config(RobertaConfig, sizes, tokenizer, overrides)
    torch.manual_seed(seed)
    return RobertaForSequenceClassification(config).eval()


def tiny_t5(seed: int = 0, tokenizer=None, **overrides):
    """A random T5 encoder-decoder (2 + 2 layers, d_model 32, 4 heads) for sequence-to-sequence tests."""
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = tokenizer or get_tiny_tokenizer()
    sizes = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=tokenizer.pad_token_id)
    config = _tiny_config(T5Config, sizes, tokenizer, overrides)
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config).eval()


def tiny_albert_config(tokenizer=None, **overrides):
    """A tiny ALBERT config (embedding 16, hidden 32, 4 heads, 4 shared-layer steps)."""
    from transformers import AlbertConfig

    sizes = dict(embedding_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 max_position_embeddings=128)
    return _tiny_config(AlbertConfig, sizes, tokenizer, overrides)


def tiny_albert(seed: int = 0, tokenizer=None, num_labels: int = 2, **overrides):
    """A random tiny ALBERT with a sequence-classification head."""
    from transformers import AlbertForSequenceClassification

    config = tiny_albert_config(tokenizer, num_labels=num_labels, **overrides)
    torch.manual_seed(seed)
    return AlbertForSequenceClassification(config).eval()



def tiny_ddlm(seed: int = 0, tokenizer=None, **overrides):
    """A random 1-block DDLM (embedding 8, hidden 32, 2 heads, 16 positions) with a non-trivial time warp.

    The warp's logits are drawn after the weights (uniform logits are the initial value), so that a save/load test
    notices a warp that was not kept.
    """
    from hf_ext.models.ddlm import DDLMConfig, DDLMModel

    sizes = dict(embedding_dim=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=16, time_warp_bins=8)
    config = _tiny_config(DDLMConfig, sizes, tokenizer, overrides)
    torch.manual_seed(seed)
    model = DDLMModel(config).eval()
    with torch.no_grad():
        model.time_warp.logits.normal_()
    return model

_FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out_as_hub_repo(folder: str | os.PathLike, repo_id: str, cache_dir: str | os.PathLike) -> Path:
    """Copy a saved folder into ``cache_dir`` as the Hub cache lays out ``repo_id``.

    Afterwards ``from_pretrained(repo_id, cache_dir=cache_dir)`` with ``HF_HUB_OFFLINE=1`` loads it
    as if it had been downloaded. Returns the snapshot folder.
    """
    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / _FAKE_COMMIT
    if snapshot.exists():
        shutil.rmtree(snapshot)
    shutil.copytree(folder, snapshot)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(_FAKE_COMMIT)
    return snapshot


_RELOAD_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    spec = json.loads(sys.argv[1])
    if not spec["hf_ext_importable"]:
        class _BlockHfExt(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "hf_ext" or name.startswith("hf_ext."):
                    raise ModuleNotFoundError(f"No module named {name!r} (blocked)")
                return None
        sys.meta_path.insert(0, _BlockHfExt())
    else:
        import hf_ext  # noqa: F401  (registers the Auto classes)

    import torch, transformers
    from safetensors.torch import load_file, save_file

    auto_cls = getattr(transformers, spec["auto_class"])
    model = auto_cls.from_pretrained(spec["repo_id"], cache_dir=spec["cache_dir"], trust_remote_code=spec["trust_remote_code"])
    model.eval()
    with torch.no_grad():
        outputs = model(**load_file(spec["inputs"]))
    tensors = {k: v.contiguous() for k, v in outputs.items() if isinstance(v, torch.Tensor)}
    save_file(tensors, spec["outputs"])
    print(json.dumps({"class": type(model).__module__ + "." + type(model).__name__}))
    """
)


def reload_in_subprocess(
    model,
    inputs: dict[str, torch.Tensor],
    *,
    auto_class: str = "AutoModel",
    hf_ext_importable: bool = True,
    trust_remote_code: bool = False,
    repo_id: str = "hf-ext-testing/tiny-model",
    timeout: float = 300,
) -> tuple[dict[str, torch.Tensor], str]:
    """Save ``model`` as a Hub repo, reload it in a fresh Python process and run it on ``inputs``.

    The subprocess loads with ``transformers.<auto_class>.from_pretrained(repo_id)`` from a local
    Hub cache with ``HF_HUB_OFFLINE=1``. With ``hf_ext_importable=False`` any import of ``hf_ext``
    fails there, so the model can only come from its remote code (``trust_remote_code=True``).

    Returns:
        The tensor fields of the reloaded model's output, and the qualified name of the class that
        was instantiated (to tell remote code from the installed package).

    Raises:
        RuntimeError: the subprocess failed; its stderr is in the message.
    """
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model.save_pretrained(tmp / "saved")
        lay_out_as_hub_repo(tmp / "saved", repo_id, tmp / "cache")
        save_file({k: v.contiguous() for k, v in inputs.items()}, tmp / "inputs.safetensors")
        spec = dict(
            hf_ext_importable=hf_ext_importable, auto_class=auto_class, repo_id=repo_id, cache_dir=str(tmp / "cache"),
            trust_remote_code=trust_remote_code, inputs=str(tmp / "inputs.safetensors"), outputs=str(tmp / "outputs.safetensors"),
        )
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp / "modules"), "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(
            [sys.executable, "-c", _RELOAD_SCRIPT, json.dumps(spec)], env=env, capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0:
            raise RuntimeError(f"reloading in a subprocess failed:\n{proc.stderr[-4000:]}")
        class_name = json.loads(proc.stdout.strip().splitlines()[-1])["class"]
        return load_file(tmp / "outputs.safetensors"), class_name


__all__ = [
    "SPECIAL_TOKENS",
    "get_tiny_bpe_tokenizer",
    "get_tiny_tokenizer",
    "lay_out_as_hub_repo",
    "reload_in_subprocess",
    "tiny_albert",
    "tiny_albert_config",
    "tiny_causal_lm",
    "tiny_corpus",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_roberta",
    "tiny_t5",
]
