"""PALBERT configuration: ALBERT's configuration plus the pondering (exit) settings.

Paper: "PALBERT: Teaching ALBERT to Ponder", Balagansky & Gavrilov, NeurIPS 2022,
https://arxiv.org/abs/2204.03276. The exit head and the prior follow PonderNet (Banino et al., 2021,
https://arxiv.org/abs/2107.05407).
"""

from huggingface_hub.dataclasses import strict
from transformers import AlbertConfig

INFERENCE_MODES = ("q_exit", "sample", "expectation", "full")
LAMBDA_HEADS = ("revisited", "linear")


@strict
class PalbertConfig(AlbertConfig):
    r"""
    Configuration of [`PalbertModel`] and [`PalbertForSequenceClassification`]: every
    [`~transformers.AlbertConfig`] field, plus the pondering settings below. Build a model and its config from an
    ALBERT checkpoint with [`PalbertForSequenceClassification.from_albert_pretrained`].

    Args:
        exit_threshold (`float`, *optional*, defaults to 0.5):
            q of the Q-exit rule: in `"q_exit"` mode an example exits at the first step t whose cumulative
            exit probability sum_{k<=t} p_k exceeds q (paper, Sec. 3, "Q-exit"). In (0, 1).
        prior_lambda (`float`, *optional*, defaults to 0.1):
            lambda_p of the truncated geometric prior p_G(k) = lambda_p (1 - lambda_p)^(k-1), the last step
            taking the remaining mass (PonderNet, Eq. 5). In (0, 1).
        beta (`float`, *optional*, defaults to 0.5):
            Weight of the KL regulariser: loss = sum_t p_t L_t + beta KL(p || p_G) (PonderNet, Eq. 4). >= 0.
        lambda_head (`str`, *optional*, defaults to `"revisited"`):
            `"revisited"`: PALBERT's exit head lambda_t = sigmoid(MLP([pooled_t; pooled_{t-1}])) with pooled_0 = 0
            (paper, Sec. 3); `"linear"`: PonderNet's lambda_t = sigmoid(w^T pooled_t + b).
        lambda_head_layers (`int`, *optional*, defaults to 3):
            Number of Linear(2H, 2H) + Tanh blocks before the output Linear(2H, 1) of the `"revisited"` head
            (3 in the reference code). >= 0; ignored by the `"linear"` head.
        inference_mode (`str`, *optional*, defaults to `"q_exit"`):
            How an eval-mode forward turns the per-step outputs into one prediction: `"q_exit"` (deterministic
            exit, see `exit_threshold`), `"sample"` (exit at step t with probability lambda_t, as PonderNet),
            `"expectation"` (sum_t p_t softmax(logits_t); for regression sum_t p_t y_t) or `"full"` (all steps,
            the last step's logits). `"q_exit"` and `"sample"` stop computing exited examples.

    Examples:

    ```python
    >>> from hf_ext import PalbertConfig
    >>> config = PalbertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, exit_threshold=0.7)
    >>> config.model_type, config.exit_threshold, config.lambda_head
    ('palbert', 0.7, 'revisited')

    ```
    """

    model_type = "palbert"

    exit_threshold: int | float = 0.5
    prior_lambda: int | float = 0.1
    beta: int | float = 0.5
    lambda_head: str = "revisited"
    lambda_head_layers: int = 3
    inference_mode: str = "q_exit"

    def validate_pondering(self):
        """Check the pondering fields. `@strict` runs this on construction, on loading and on `save_pretrained`
        (so a config edited after construction, `config.exit_threshold = 1.5`, is not saved), and raises
        `huggingface_hub.errors.StrictDataclassClassValidationError` quoting the `ValueError` below, as
        transformers' own configs do."""
        for name in ("exit_threshold", "prior_lambda"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"`{name}` must be in the open interval (0, 1), got {value}.")
        if self.beta < 0:
            raise ValueError(f"`beta` must be >= 0, got {self.beta}.")
        if self.lambda_head not in LAMBDA_HEADS:
            raise ValueError(f"`lambda_head` must be one of {LAMBDA_HEADS}, got {self.lambda_head!r}.")
        if self.lambda_head_layers < 0:
            raise ValueError(f"`lambda_head_layers` must be >= 0, got {self.lambda_head_layers}.")
        if self.inference_mode not in INFERENCE_MODES:
            raise ValueError(f"`inference_mode` must be one of {INFERENCE_MODES}, got {self.inference_mode!r}.")


__all__ = ["PalbertConfig"]
