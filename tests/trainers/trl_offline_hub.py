"""Offline stand-ins for the Hub repositories TRL's DPO tests load (`trl-internal-testing/...`).

TRL's `tests/test_dpo_trainer.py` trains tiny models that TRL keeps on the Hub, on small datasets kept there too.
Tests here never reach the network, so :func:`build_offline_hub` builds equivalents in code and lays them out as
the Hub cache lays out a repository (:func:`hf_ext.testing.lay_out_as_hub_repo`), and :func:`offline_load_dataset`
serves the datasets from local parquet files under the same ids, configs and splits:

- models: a random 2-layer model of the same architecture (:func:`hf_ext.testing.tiny_causal_lm`) with hf_ext's
  tiny byte-level BPE tokenizer and its chat template; `tiny-RemoteForCausalLM` is a Qwen2 served as remote code
  (``trl_remote_model/``), so that loading it needs ``trust_remote_code=True``.
- datasets: ``zen`` in TRL's preference formats (standard / conversational, explicit / implicit prompt, unpaired),
  ``harmony`` (assistant turns with a ``thinking`` field) and ``toolcall`` (tool calls, tool turns and a ``tools``
  column), built from :func:`hf_ext.data.preference.preference_dataset` with the same columns as TRL's, 19 rows
  split 17 / 2 into train / test as TRL's are.
"""

import json
import shutil
from pathlib import Path

import datasets
from safetensors.torch import save_file

from hf_ext.data.preference import preference_dataset
from hf_ext.testing import get_tiny_bpe_tokenizer, lay_out_as_hub_repo, tiny_causal_lm

ORG = "trl-internal-testing"
TINY_MODELS = {  # repo name -> model_type
    "tiny-Qwen2ForCausalLM-2.5": "qwen2",
    "tiny-Cohere2ForCausalLM": "cohere2",
    "tiny-Glm4MoeForCausalLM": "glm4_moe",
    "tiny-GptOssForCausalLM": "gpt_oss",
    "tiny-Qwen3MoeForCausalLM": "qwen3_moe",
    "tiny-NemotronHForCausalLM-nano": "nemotron_h",
    "tiny-Olmo3ForCausalLM": "olmo3",
    "tiny-Lfm2ForCausalLM": "lfm2",
    "tiny-Lfm2ForCausalLM-2.5": "lfm2",
}
REMOTE_MODEL = "tiny-RemoteForCausalLM"
_REMOTE_CODE = Path(__file__).with_name("trl_remote_model")
_ROWS, _TEST_ROWS = 19, 2


def _save_model(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _save_remote_model(tokenizer, folder: Path) -> None:
    """Qwen2 weights with a config whose `auto_map` points at the code files copied next to it."""
    qwen = tiny_causal_lm("qwen2", tokenizer=tokenizer)
    config = qwen.config.to_dict()
    config.update(
        model_type="remote",
        architectures=["RemoteForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_remote.RemoteConfig",
            "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM",
        },
    )
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for code in ("configuration_remote.py", "modeling_remote.py"):
        shutil.copy(_REMOTE_CODE / code, folder / code)
    save_file({k: v.contiguous() for k, v in qwen.state_dict().items()}, str(folder / "model.safetensors"))
    tokenizer.save_pretrained(folder)


def _zen_configs() -> dict[str, datasets.Dataset]:
    """TRL's preference formats of the same pairs."""
    pairs = preference_dataset(_ROWS, seed=0).select_columns(["prompt", "chosen", "rejected"])
    rows = pairs.to_list()

    def user(text):
        return [{"role": "user", "content": text}]

    def assistant(text):
        return [{"role": "assistant", "content": text.strip()}]

    return {
        "standard_preference": pairs,
        "conversational_preference": datasets.Dataset.from_list(
            [
                {"prompt": user(r["prompt"]), "chosen": assistant(r["chosen"]), "rejected": assistant(r["rejected"])}
                for r in rows
            ]
        ),
        "standard_implicit_prompt_preference": datasets.Dataset.from_list(
            [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]
        ),
        "conversational_implicit_prompt_preference": datasets.Dataset.from_list(
            [
                {
                    "chosen": user(r["prompt"]) + assistant(r["chosen"]),
                    "rejected": user(r["prompt"]) + assistant(r["rejected"]),
                }
                for r in rows
            ]
        ),
        "standard_unpaired_preference": datasets.Dataset.from_list(
            [
                {"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"}
                for i, r in enumerate(rows)
                for key in (("chosen",) if i % 2 == 0 else ("rejected",))
            ]
        ),
    }


def _harmony_preference() -> datasets.Dataset:
    """Conversational pairs whose assistant turns carry a `thinking` field, as in GPT-OSS's harmony format."""
    rows = preference_dataset(_ROWS, seed=1).to_list()
    return datasets.Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "thinking": "it is good", "content": r["chosen"].strip()}],
                "rejected": [{"role": "assistant", "thinking": "it is bad", "content": r["rejected"].strip()}],
            }
            for r in rows
        ]
    )


def _toolcall_preference() -> datasets.Dataset:
    """Conversational pairs where the chosen answer calls a tool (tool call, tool turn, answer), with `tools`."""
    tool = {
        "type": "function",
        "function": {
            "name": "rate",
            "description": "Rate a sentence.",
            "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
        },
    }
    rows = preference_dataset(_ROWS, seed=2).to_list()
    return datasets.Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [
                            {"type": "function", "function": {"name": "rate", "arguments": {"text": r["prompt"]}}}
                        ],
                    },
                    {"role": "tool", "content": str(r["chosen_reward"])},
                    {"role": "assistant", "content": r["chosen"].strip()},
                ],
                "rejected": [{"role": "assistant", "content": r["rejected"].strip()}],
                "tools": json.dumps([tool]),
            }
            for r in rows
        ]
    )


def _write_dataset(root: Path, repo: str, configs: dict[str, datasets.Dataset]) -> None:
    """Each config as `<config>/{train,test}.parquet`, the split TRL's generation scripts make (last rows: test)."""
    for name, dataset in configs.items():
        split = dataset.train_test_split(test_size=_TEST_ROWS, shuffle=False)
        for split_name, part in split.items():
            path = root / "datasets" / repo / name / f"{split_name}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            part.to_parquet(str(path))


def build_offline_hub(root: Path) -> Path:
    """Build the models (in ``root/hub``, as the Hub cache) and the datasets (``root/datasets``); returns ``root``."""
    tokenizer = get_tiny_bpe_tokenizer()
    for name, model_type in TINY_MODELS.items():
        folder = root / "saved" / name
        _save_model(tiny_causal_lm(model_type, tokenizer=tokenizer), tokenizer, folder)
        lay_out_as_hub_repo(folder, f"{ORG}/{name}", root / "hub")
    _save_remote_model(tokenizer, root / "saved" / REMOTE_MODEL)
    lay_out_as_hub_repo(root / "saved" / REMOTE_MODEL, f"{ORG}/{REMOTE_MODEL}", root / "hub")
    _write_dataset(root, "zen", _zen_configs())
    _write_dataset(root, "harmony", {"preference": _harmony_preference()})
    _write_dataset(root, "toolcall", {"preference": _toolcall_preference()})
    return root


def offline_load_dataset(root: Path, path: str, name: str | None = None, split: str | None = None, **kwargs):
    """`datasets.load_dataset` for the ``trl-internal-testing`` ids, from the parquet files of :func:`build_offline_hub`.

    Raises:
        FileNotFoundError: for an id or config that has no offline stand-in, naming it.
    """
    org, _, repo = path.partition("/")
    folder = root / "datasets" / repo / (name or "")
    if org != ORG or not folder.is_dir():
        raise FileNotFoundError(f"No offline stand-in for dataset {path!r}, config {name!r} (see {__name__}).")
    files = {part.stem: str(part) for part in sorted(folder.glob("*.parquet"))}
    return datasets.load_dataset("parquet", data_files=files, split=split, **kwargs)


__all__ = ["ORG", "REMOTE_MODEL", "TINY_MODELS", "build_offline_hub", "offline_load_dataset"]
