"""Demo: AoT P-Tuning vs BitFit vs LoRA vs head-only tuning of a tiny encoder.

Claim (AoT P-Tuning, arXiv 2305.10835, abstract and §4.2): per-token biases added before each layer adapt a
frozen backbone as well as or better than BitFit and comparably to other parameter-efficient methods. Here: a
tiny RoBERTa is pre-trained for a few seconds as a masked LM on the tiny corpus, then each method adapts it
(frozen, with a new head) to a topic task on the same sentences (:mod:`hf_ext.data.classification`), with the
same steps and learning rate; we report test accuracy and trainable parameters, and check that AoT's collapsed
tables give the same predictions as its FC reparametrization.
"""

import copy

import torch

from hf_ext.demo import DemoContext, SectionResult, register_section

HIDDEN = 64
STEPS = 60
PRETRAIN_STEPS = 100
BATCH_SIZE = 32


def _tiny_encoder(tokenizer, seed: int):
    """A random 2-layer RoBERTa of width `HIDDEN` with a 2-class head."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id, num_labels=2,
    )
    torch.manual_seed(seed)
    return RobertaForSequenceClassification(config)


def _pretrain_mlm(model, tokenizer, steps: int, seed: int):
    """Masked-LM pre-training of `model`'s encoder on the tiny corpus, so that adapting it means something."""
    from transformers import RobertaForMaskedLM

    from hf_ext.testing import tiny_corpus

    mlm = RobertaForMaskedLM(model.config)
    mlm.roberta.load_state_dict(model.roberta.state_dict())
    encoded = tokenizer(tiny_corpus(), padding="longest", return_tensors="pt")
    input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
    optimizer = torch.optim.AdamW(mlm.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    mlm.train()
    for _ in range(steps):
        rows = torch.randint(len(input_ids), (BATCH_SIZE,), generator=generator)
        ids, mask = input_ids[rows], attention_mask[rows]
        masked = (torch.rand(ids.shape, generator=generator) < 0.15) & mask.bool()
        labels = torch.where(masked, ids, -100)
        loss = mlm(input_ids=ids.masked_fill(masked, tokenizer.mask_token_id), attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.roberta.load_state_dict(mlm.roberta.state_dict())
    return model.eval()


def _encode(tokenizer, dataset):
    """Input ids with a leading `<s>` (the position RoBERTa's head reads), attention mask, labels."""
    encoded = tokenizer(list(dataset["text"]), padding="longest", return_tensors="pt")
    batch = len(dataset)
    input_ids = torch.cat([torch.full((batch, 1), tokenizer.bos_token_id), encoded["input_ids"]], dim=1)
    attention_mask = torch.cat([torch.ones(batch, 1, dtype=torch.long), encoded["attention_mask"]], dim=1)
    return input_ids, attention_mask, torch.tensor(list(dataset["label"]))


def _train(model, data, steps: int, lr: float, seed: int):
    input_ids, attention_mask, labels = data
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        rows = torch.randint(len(labels), (BATCH_SIZE,), generator=generator)
        loss = model(input_ids=input_ids[rows], attention_mask=attention_mask[rows], labels=labels[rows]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def _predict(model, data):
    input_ids, attention_mask, _ = data
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.argmax(-1)


def _accuracy(model, data) -> float:
    return (_predict(model, data) == data[2]).float().mean().item()


def _with_new_head(backbone, seed: int):
    model = copy.deepcopy(backbone)
    torch.manual_seed(seed)
    for module in model.classifier.modules():
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()
    return model


def _head_only(model):
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("classifier.")
    return model


def _bitfit(model):
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("classifier.") or name.endswith(".bias")
    return model


def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"]))


def _aot(reparametrization: str):
    def build(model):
        from peft import get_peft_model

        from hf_ext import AoTPTuningConfig

        config = AoTPTuningConfig(
            task_type="SEQ_CLS", reparametrization=reparametrization, fc_hidden_size=32, kronecker_rank=4
        )
        return get_peft_model(model, config)

    return build


# name -> (how to make the model trainable, learning rate)
METHODS = {
    "head-only": (_head_only, 1e-2),
    "BitFit": (_bitfit, 1e-2),
    "LoRA r=4": (_lora, 1e-2),
    "AoT fc": (_aot("fc"), 1e-2),
    "AoT kronecker": (_aot("kronecker"), 1e-2),
}


@register_section("aot_ptuning", title="AoT P-Tuning vs BitFit vs LoRA vs head-only on a tiny encoder")
def run(ctx: DemoContext) -> SectionResult:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hf_ext.data.classification import topic_dataset
    from hf_ext.testing import get_tiny_tokenizer

    tokenizer = get_tiny_tokenizer()
    # 1. the "pre-trained" backbone: a tiny RoBERTa after a few seconds of masked-LM training
    backbone = _pretrain_mlm(_tiny_encoder(tokenizer, ctx.seed), tokenizer, steps=PRETRAIN_STEPS, seed=ctx.seed)
    ctx.log("backbone pre-trained (masked LM on the tiny corpus)")

    # 2. adapt it to the topic task with each method
    train = _encode(tokenizer, topic_dataset(800, seed=ctx.seed + 1))
    test = _encode(tokenizer, topic_dataset(300, seed=ctx.seed + 2))
    rows, aot_fc_model = [], None
    for name, (make_trainable, lr) in METHODS.items():
        model = make_trainable(_with_new_head(backbone, ctx.seed))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        _train(model, train, steps=STEPS, lr=lr, seed=ctx.seed)
        rows.append({"method": name, "trainable_params": trainable, "test_accuracy": round(_accuracy(model, test), 4)})
        ctx.log(f"{name}: accuracy {rows[-1]['test_accuracy']:.3f} with {trainable} trainable parameters")
        if name == "AoT fc":
            aot_fc_model = model

    # 3. AoT's collapsed tables predict exactly as its reparametrization
    reparametrized = _predict(aot_fc_model, test)
    aot_fc_model.base_model.collapse()
    same_predictions = bool(torch.equal(_predict(aot_fc_model, test), reparametrized))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r["method"] for r in rows], [r["test_accuracy"] for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        ax.text(i, r["test_accuracy"] + 0.01, f"{r['trainable_params']:,} params", ha="center", fontsize=7)
    ax.set_ylim(0.4, 1.08)
    ax.set_ylabel("test accuracy (topic task)")
    ax.set_title("Adapting a frozen, MLM-pre-trained tiny RoBERTa to a topic task")
    fig.tight_layout()
    fig.savefig(ctx.figure_path("aot_ptuning_accuracy.png"), dpi=120)
    plt.close(fig)

    by_name = {r["method"]: r for r in rows}
    return SectionResult(
        claim="AoT P-Tuning adapts a frozen encoder at least as well as BitFit, comparably to LoRA (paper §4.2).",
        metrics={
            "acc_aot_fc": by_name["AoT fc"]["test_accuracy"],
            "acc_aot_kronecker": by_name["AoT kronecker"]["test_accuracy"],
            "acc_bitfit": by_name["BitFit"]["test_accuracy"],
            "acc_lora": by_name["LoRA r=4"]["test_accuracy"],
            "acc_head_only": by_name["head-only"]["test_accuracy"],
            "collapsed_same_predictions": str(same_predictions),
        },
        table=rows,
        figures=["aot_ptuning_accuracy.png"],
        notes=f"A 2-layer width-{HIDDEN} encoder pre-trained for seconds, {STEPS} steps of tuning on synthetic data, "
        "not RoBERTa on GLUE; trainable parameters include the classification head.",
    )


__all__ = ["run"]
