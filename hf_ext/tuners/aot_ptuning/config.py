"""Configuration of AoT P-Tuning ("Ahead-of-Time P-Tuning", Gavrilov & Balagansky, arXiv 2305.10835)."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig
from peft.utils import PeftType

REPARAMETRIZATIONS = ("fc", "kronecker", "none")


@dataclass
class AoTPTuningConfig(PeftConfig):
    """Configuration of an [`AoTPTuningModel`] adapter.

    AoT P-Tuning adds, before every Transformer layer l (the first one included), an input-dependent bias to
    the hidden state of each position t: ``H_l[t] <- H_l[t] + P_l[x_t]``, where ``x_t`` is the token id at t and
    ``P_l`` is a ``|V| x d`` table. The sequence does not grow, so inference costs one row gather and one add per
    layer once the tables are computed ("collapsed"). During training ``P_l`` comes from a reparametrization:

    - ``"fc"``: ``P_l = f(E W1_l + b1_l) W2_l + b2_l`` over the frozen input embedding matrix ``E`` (|V| x d_emb),
      with ``f`` = ReLU and ``W1_l`` of shape ``d_emb x fc_hidden_size``;
    - ``"kronecker"``: ``P_l = (WL_l ⊗ WM_l) WR_l`` with ``WL_l`` (a x r), ``WM_l`` (b x r), ``a = b = ceil(sqrt(|V|))``,
      ``WR_l`` (r² x d) and ``r = kronecker_rank``; the rows past |V| are never used;
    - ``"none"``: ``P_l`` is trained as a raw table.

    What the paper's text confirms (read: the abstract, §1 with the Figure 2 caption and the contribution list of
    the ICLR 2023 submission, OpenReview 8IBtyLQ8GKw; arXiv 2305.10835 abstract): input-dependent biases are added
    to the input sequence before evaluating each Transformer layer (so the first one too), without growing the
    sequence, so that tasks can share one batch; the two reparametrizations are "based on a factorized matrix
    trained from scratch" (here `"kronecker"`) and "based on a LM's embeddings matrix passed through a trainable
    Fully Connected network" (`"fc"`); results are in §4.2 (GLUE/SuperGLUE, RoBERTa-Base/Large, DeBERTa-XL) and
    inference speed in §4.3.

    NOT VERIFIED (the method section, §3 by the numbering around it, and the hyper-parameter tables could not be
    read; see PAPERS.md): the exact formulas above (the Kronecker factor shapes with ``a = b = ceil(sqrt(|V|))``,
    the FC biases ``b1, b2`` and ``f`` = ReLU); that every layer has its own reparametrization weights; the
    initialisation (here the last factor of each reparametrization, ``W2_l, b2_l``, ``WR_l`` or the raw
    table, starts at zero so that the adapted model starts as the base model; see `init_weights`); and the
    defaults below (256, 16), which are ours, not the paper's.

    Args:
        reparametrization (`str`, defaults to `"fc"`):
            How ``P_l`` is computed while training: `"fc"`, `"kronecker"` or `"none"` (the raw table).
        fc_hidden_size (`int`, defaults to 256):
            Hidden size of the FC reparametrization (columns of ``W1_l``). Used only with `"fc"`.
        kronecker_rank (`int`, defaults to 16):
            Rank ``r`` of each Kronecker factor (``WR_l`` has r² rows). Used only with `"kronecker"`.
        init_weights (`bool`, defaults to `True`):
            Start the last factor of each reparametrization (``W2_l`` and ``b2_l``, ``WR_l``, or the raw table) at
            zero, so that the adapted model starts as the base model. `False` draws it from N(0, 0.02²) instead:
            the adapter then changes the outputs from the start, which is for tests (as PEFT's methods'
            `init_weights=False`), not for training.
        save_collapsed (`bool`, defaults to `False`):
            Save the collapsed tables ``P_l`` (|V| x d per layer) instead of the reparametrization weights. The
            saved config then says ``reparametrization="none"``, since raw tables are what the file holds, and it
            loads (and can be trained further) as such.
        target_modules (`Optional[Union[list[str], str]]`):
            The Transformer layers to add a bias before (names or a regex, matched as in other PEFT methods).
            Left as `None`, the layers are found in the model: the outermost `nn.ModuleList` named `layer`,
            `layers`, `h`, `block` or `blocks` (in an encoder-decoder, one in the encoder and one in the decoder,
            whose layers take the decoder's token ids).
        vocab_size (`Optional[int]`):
            Rows of each table, |V|. Left as `None`, it is taken from the model's input embedding; loading an
            adapter onto a model whose input embedding has another number of rows raises a `ValueError`.
        modules_to_save (`Optional[list[str]]`):
            Modules besides the AoT biases to train and save, e.g. the classification head (`["classifier"]`);
            `PeftModelForSequenceClassification` adds `classifier` and `score` itself.

    Examples:

    ```python
    >>> import hf_ext
    >>> from peft import get_peft_model
    >>> from hf_ext import AoTPTuningConfig
    >>> from hf_ext.testing import tiny_roberta
    >>> model = get_peft_model(tiny_roberta(), AoTPTuningConfig(task_type="SEQ_CLS", fc_hidden_size=8))
    >>> model.print_trainable_parameters()  # 2 layers x (32*8 + 8 + 8*32 + 32) + the head
    trainable params: 2,226 || all params: 28,852 || trainable%: 7.7152

    ```
    """

    reparametrization: Literal["fc", "kronecker", "none"] = field(
        default="fc",
        metadata={"help": "How the tables P_l are trained: 'fc' (f(E W1) W2 over the frozen embeddings E), "
                          "'kronecker' ((WL ⊗ WM) WR) or 'none' (raw tables)."},
    )
    fc_hidden_size: int = field(
        default=256, metadata={"help": "Hidden size of the FC reparametrization (>= 1); only with 'fc'."}
    )
    kronecker_rank: int = field(
        default=16, metadata={"help": "Rank r of each Kronecker factor (>= 1); only with 'kronecker'."}
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "Start the last factor of each reparametrization at zero (identity adapter); False draws "
                          "it from N(0, 0.02^2) (for tests)."},
    )
    save_collapsed: bool = field(
        default=False,
        metadata={"help": "Save the collapsed |V| x d tables instead of the reparametrization weights."},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Transformer layers to add a bias before (names or regex); found in the model if None."},
    )
    vocab_size: int | None = field(
        default=None, metadata={"help": "Rows |V| of each table; taken from the model's input embedding if None."}
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules besides the AoT biases to train and save, e.g. the classification head."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType("AOT_PTUNING")  # the member hf_ext adds on import (see register())
        if self.reparametrization not in REPARAMETRIZATIONS:
            raise ValueError(
                f"`reparametrization` must be one of {REPARAMETRIZATIONS}, got {self.reparametrization!r}."
            )
        for name in ("fc_hidden_size", "kronecker_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"`init_weights` must be True or False, got {self.init_weights!r}.")
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int) or self.vocab_size < 1):
            raise ValueError(f"`vocab_size` must be None or an integer >= 1, got {self.vocab_size!r}.")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if self.save_collapsed and self.reparametrization == "none":
            warnings.warn(
                "`save_collapsed=True` has no effect with reparametrization='none': it saves tables anyway.",
                stacklevel=2,
            )

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Save the config; with `save_collapsed`, as the config of the raw tables that the weights file holds."""
        if not self.save_collapsed or self.reparametrization == "none":
            return super().save_pretrained(save_directory, **kwargs)
        saved = dataclasses.replace(self, reparametrization="none", save_collapsed=False)
        return saved.save_pretrained(save_directory, **kwargs)


__all__ = ["AoTPTuningConfig"]
