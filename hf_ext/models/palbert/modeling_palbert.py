"""PALBERT: ALBERT that ponders over its shared layer and exits early, per example.

Paper: "PALBERT: Teaching ALBERT to Ponder", Balagansky & Gavrilov, NeurIPS 2022,
https://arxiv.org/abs/2204.03276, built on PonderNet (Banino et al., 2021, https://arxiv.org/abs/2107.05407).

ALBERT applies one shared layer L times. PALBERT reads a prediction and an exit probability after
every application t = 1..L:

    pooled_t = tanh(W_p h_t[CLS] + b_p)                      ALBERT's pooler, reused at every step
    y_t      = classifier(pooled_t)                           one classifier shared by all steps
    lambda_t = sigmoid(Lambda([pooled_t; pooled_{t-1}]))      PALBERT's revisited exit head, pooled_0 = 0
    p_t      = lambda_t prod_{j<t} (1 - lambda_j),  t < L     PonderNet Eq. 2
    p_L      = prod_{j<L} (1 - lambda_j)                      the last step takes the remaining mass
    loss     = sum_t p_t L(y_t, y) + beta KL(p || p_G)        PonderNet Eq. 4, p_G truncated geometric

At inference the Q-exit rule stops at the first step whose cumulative exit probability exceeds q.
Here exited examples leave the batch, so the remaining ones run on a smaller batch at each step.
The exit decision needs only the pooler and the exit head, so it lives in the base model, `PalbertModel`,
which returns each example's state at its exit step; `PalbertForSequenceClassification` adds the
classifier and the loss. The modules are ALBERT's own, so any ALBERT checkpoint initialises the encoder.
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AlbertConfig, AlbertPreTrainedModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling, SequenceClassifierOutput
from transformers.models.albert.modeling_albert import AlbertEmbeddings, AlbertTransformer
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .configuration_palbert import INFERENCE_MODES, PalbertConfig


def exit_distribution(lambdas: torch.Tensor) -> torch.Tensor:
    """p_t = lambda_t prod_{j<t} (1 - lambda_j), the last step taking the remaining mass (PonderNet Eq. 2).

    Args:
        lambdas: `(B, L - 1)` exit probabilities of the steps 1..L-1 (the last step needs none).

    Returns:
        `(B, L)` exit distribution; each row sums to 1.
    """
    ones = lambdas.new_ones(lambdas.shape[0], 1)
    survival = torch.cumprod(torch.cat([ones, 1 - lambdas], dim=-1), dim=-1)  # (B, L): prod_{j<t} (1 - lambda_j)
    return survival * torch.cat([lambdas, ones], dim=-1)  # lambda_L = 1: everything left exits at step L


def truncated_geometric_prior(prior_lambda: float, num_steps: int, **tensor_kwargs) -> torch.Tensor:
    """p_G(k) = lambda_p (1 - lambda_p)^(k-1) for k < L and the remaining mass at k = L (PonderNet Eq. 5).

    Returns:
        `(L,)` prior over the exit step.
    """
    lambdas = torch.full((1, num_steps - 1), prior_lambda, **tensor_kwargs)
    return exit_distribution(lambdas)[0]


def kl_to_prior(exit_probs: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """KL(p || p_G) = sum_t p_t (log p_t - log p_G(t)), per example.

    This is the direction the paper writes (after PonderNet). The reference code computes
    `KLDivLoss(log p, p_G)`, which is KL(p_G || p).

    Args:
        exit_probs: `(B, L)` exit distribution p.
        prior: `(L,)` prior p_G.

    Returns:
        `(B,)` divergences.
    """
    # p_t log p_t is 0 at p_t = 0, but xlogy's gradient there is 0/0 = NaN; p_t is exactly 0 as soon as one
    # lambda_j rounds to 1 (a logit above ~17 in float32, far less in half precision). Clamping the log's
    # argument leaves the value unchanged (to 1e-36) and the gradient at p_t = 0 at 0.
    log_argument = exit_probs.clamp_min(torch.finfo(exit_probs.dtype).tiny)
    return (torch.special.xlogy(exit_probs, log_argument) - exit_probs * prior.log()).sum(-1)


def q_exit_step(exit_probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """The Q-exit rule: the first step t with sum_{k<=t} p_k > q (paper Sec. 3), 1-based.

    Args:
        exit_probs: `(B, L)` exit distribution.
        threshold: q in (0, 1).

    Returns:
        `(B,)` long tensor of exit steps in 1..L.
    """
    crossed = exit_probs.cumsum(-1) > threshold
    crossed[:, -1] = True  # the cumulative mass is 1 at step L, whatever rounding says
    return crossed.int().argmax(-1) + 1  # argmax returns the first maximum


def select_exit_steps(per_step: list[torch.Tensor], exit_step: torch.Tensor) -> torch.Tensor:
    """Each example's entry at its exit step: row b of `per_step[exit_step[b] - 1]`.

    Args:
        per_step: L tensors `(B, ...)`, one per step.
        exit_step: `(B,)` 1-based exit steps.

    Returns:
        `(B, ...)`; `torch.where` keeps gradients flowing to the selected steps only.
    """
    selected = per_step[0]
    for step, value in enumerate(per_step[1:], start=2):
        later = (exit_step >= step).view(-1, *[1] * (value.dim() - 1))
        selected = torch.where(later, value, selected)
    return selected


def _resolve_inference_mode(config: PalbertConfig, inference_mode: str | None) -> str:
    mode = config.inference_mode if inference_mode is None else inference_mode
    if mode not in INFERENCE_MODES:
        raise ValueError(f"`inference_mode` must be one of {INFERENCE_MODES}, got {mode!r}.")
    return mode


def _batch_size(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> int:
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Specify exactly one of `input_ids` and `inputs_embeds`.")
    return (input_ids if input_ids is not None else inputs_embeds).shape[0]


class PalbertLambdaHead(nn.Module):
    """The exit head: the logit of lambda_t.

    `"revisited"` (PALBERT, Sec. 3): Lambda([pooled_t; pooled_{t-1}]), an MLP of `lambda_head_layers`
    Linear(2H, 2H) + Tanh blocks and a Linear(2H, 1). `"linear"` (PonderNet): Linear(H, 1) on pooled_t.
    Dropout (`classifier_dropout_prob`) on the input, as the reference code does.
    """

    def __init__(self, config: PalbertConfig):
        super().__init__()
        self.uses_previous = config.lambda_head == "revisited"
        width = 2 * config.hidden_size if self.uses_previous else config.hidden_size
        depth = config.lambda_head_layers if self.uses_previous else 0
        self.dropout = nn.Dropout(config.classifier_dropout_prob)
        self.mlp = nn.Sequential(*[module for _ in range(depth) for module in (nn.Linear(width, width), nn.Tanh())])
        self.out = nn.Linear(width, 1)

    def forward(self, pooled: torch.Tensor, previous_pooled: torch.Tensor) -> torch.Tensor:
        """`(B, H)`, `(B, H)` -> `(B,)` logits of lambda_t."""
        features = torch.cat([pooled, previous_pooled], dim=-1) if self.uses_previous else pooled
        return self.out(self.mlp(self.dropout(features))).squeeze(-1)


class PalbertPreTrainedModel(AlbertPreTrainedModel):
    """ALBERT's weight initialisation, attention back-ends and output recording (`hidden_states` from every
    `AlbertLayer`, `attentions` from every `AlbertAttention`), for PALBERT's config."""

    config: PalbertConfig
    # ALBERT's prefix: a head keeps its PalbertModel under `albert`, where ALBERT's heads keep their AlbertModel, so
    # ALBERT checkpoints load (and PALBERT checkpoints save) with ALBERT's weight names.
    base_model_prefix = "albert"
    # The loss is a batch mean that ignores `num_items_in_batch`; without this, `Trainer` would see `**kwargs` in
    # `forward`, pass the count and skip its own division by the gradient accumulation steps.
    accepts_loss_kwargs = False

    @classmethod
    def from_albert_pretrained(
        cls,
        pretrained_model_name_or_path: str,
        *,
        cache_dir: str | None = None,
        revision: str = "main",
        token: str | bool | None = None,
        local_files_only: bool = False,
        **config_kwargs,
    ) -> "PalbertPreTrainedModel":
        """Build PALBERT from an ALBERT checkpoint: embeddings, shared layer and pooler reused, exit head new.

        The weight names are ALBERT's, so a headed checkpoint (`AlbertForMaskedLM`, `AlbertForSequenceClassification`,
        ...) and a bare `AlbertModel` one both load. [`PalbertForSequenceClassification`] reuses a saved classifier
        when its shape matches `num_labels`, and initialises it anew otherwise.

        Args:
            pretrained_model_name_or_path: a Hub id (`"albert/albert-base-v2"`) or a local folder of an ALBERT
                checkpoint (`model_type` "albert").
            cache_dir, revision, token, local_files_only: as in `from_pretrained`.
            config_kwargs: [`PalbertConfig`] fields overriding the checkpoint's (`num_labels`, `exit_threshold`,
                `beta`, `hidden_dropout_prob`, ...).

        Returns:
            A model of this class in eval mode, as `from_pretrained` returns it.

        Raises:
            ValueError: the checkpoint is not an ALBERT one.
        """
        hub_kwargs = dict(cache_dir=cache_dir, revision=revision, token=token, local_files_only=local_files_only)
        config_dict, _ = AlbertConfig.get_config_dict(pretrained_model_name_or_path, **hub_kwargs)
        if config_dict.get("model_type") != "albert":
            raise ValueError(
                f"`pretrained_model_name_or_path`={pretrained_model_name_or_path!r} holds a "
                f"{config_dict.get('model_type')!r} checkpoint; `from_albert_pretrained` needs an 'albert' one."
            )
        for key in ("model_type", "architectures", "auto_map", "transformers_version"):
            config_dict.pop(key, None)
        config = PalbertConfig.from_dict({**config_dict, **config_kwargs})
        # The weight names are ALBERT's (`base_model_prefix`). ignore_mismatched_sizes: a saved classifier with
        # another label count is replaced by a new one.
        return cls.from_pretrained(
            pretrained_model_name_or_path, config=config, ignore_mismatched_sizes=True, **hub_kwargs
        )


@dataclass
class PalbertModelOutput(BaseModelOutputWithPooling):
    r"""Output of [`PalbertModel`]. B: batch, T: sequence length, H: hidden size, L: `num_hidden_layers` (steps).

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(B, T, H)`):
            Each example's hidden state h_t at its exit step t (`exit_step`).
        pooler_output (`torch.FloatTensor` of shape `(B, H)`):
            pooled_t = tanh(W_p h_t[CLS] + b_p) at the exit step.
        hidden_states (`tuple(torch.FloatTensor)`, returned with `output_hidden_states=True` or
        `config.output_hidden_states=True`):
            The input of step 1 (the embeddings projected to H), then the output of every ALBERT layer of every
            step, each of shape `(B, T, H)`: `L * inner_group_num + 1` tensors, as ALBERT returns them. With
            `inner_group_num=1` (ALBERT's default) `hidden_states[t]` is h_t, the state after pondering step t.
            A list of indices as `output_hidden_states` keeps those entries only (the others are `None`).
        attentions (`tuple(torch.FloatTensor)`, returned with `output_attentions=True` or
        `config.output_attentions=True`):
            The attention weights of every ALBERT layer of every step, each of shape `(B, num_attention_heads, T, T)`:
            `L * inner_group_num` tensors. Only attention implementations that compute the weights return them
            (`attn_implementation="eager"`), as in ALBERT.
        exit_step (`torch.LongTensor` of shape `(B,)`):
            1-based step at which the example exits: by the Q-exit rule (`"q_exit"`), drawn (`"sample"`), or L
            (`"full"`, `"expectation"`). When the batch shrank, also the number of steps the example consumed.
        exit_probs (`torch.FloatTensor` of shape `(B, L)`, returned when every step ran for every example):
            The exit distribution p. `None` when examples left the batch early (later steps were never computed).
        step_pooler_outputs (`torch.FloatTensor` of shape `(B, L, H)`, returned with `exit_probs`):
            pooled_t of every step t = 1..L.
    """

    exit_step: torch.LongTensor | None = None
    exit_probs: torch.FloatTensor | None = None
    step_pooler_outputs: torch.FloatTensor | None = None


class PalbertModel(PalbertPreTrainedModel):
    r"""ALBERT pondering over its shared layer: after every step t the pooler reads pooled_t and the exit head
    lambda_t, and each example exits at the step its inference mode picks (PALBERT,
    https://arxiv.org/abs/2204.03276). The modules are ALBERT's (`AlbertEmbeddings`, `AlbertTransformer`, the
    pooler) plus the exit head.

    In eval mode, `"q_exit"` and `"sample"` drop exited examples from the batch, so each example costs only its
    own number of steps and gets the same result as when run alone. Every step runs for every example in
    training mode, in the `"full"` and `"expectation"` modes, with `early_exit=False`, and when hidden states or
    attentions are requested (exited examples keep no batch-sized states); the exit steps are then read from p by
    the same rule, and the outputs at the exit steps are the same.

    Examples:

    ```python
    >>> import torch
    >>> from hf_ext import PalbertConfig, PalbertModel
    >>> config = PalbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_attention_heads=4,
    ...                        intermediate_size=64, num_hidden_layers=6)
    >>> model = PalbertModel(config).eval()
    >>> out = model(torch.randint(5, 100, (3, 8)), output_hidden_states=True)
    >>> out.last_hidden_state.shape, out.pooler_output.shape, out.exit_step.shape
    (torch.Size([3, 8, 32]), torch.Size([3, 32]), torch.Size([3]))
    >>> len(out.hidden_states), out.exit_probs.shape
    (7, torch.Size([3, 6]))

    ```
    """

    def __init__(self, config: PalbertConfig):
        super().__init__(config)
        self.embeddings = AlbertEmbeddings(config)
        self.encoder = AlbertTransformer(config)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.pooler_activation = nn.Tanh()
        self.lambda_head = PalbertLambdaHead(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    @capture_outputs(tie_last_hidden_states=False)  # the last hidden state is the exit step's, not step L's
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        inference_mode: str | None = None,
        early_exit: bool = True,
        **kwargs: Unpack[TransformersKwargs],
    ) -> PalbertModelOutput:
        r"""
        Args:
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds: as in ALBERT.
            inference_mode (`str`, *optional*):
                Overrides `config.inference_mode` for this call: `"q_exit"`, `"sample"`, `"expectation"` or `"full"`.
            early_exit (`bool`, *optional*, defaults to `True`):
                Whether exited examples leave the batch (eval mode, `"q_exit"` and `"sample"`). `False` runs every
                step for every example and returns `exit_probs` and `step_pooler_outputs` as well, as a loss needs.
            kwargs: `output_hidden_states`, `output_attentions`, `return_dict`, and attention-implementation
                arguments passed to the layers, as in ALBERT.

        Returns:
            [`PalbertModelOutput`].
        """
        mode = _resolve_inference_mode(self.config, inference_mode)
        _batch_size(input_ids, inputs_embeds)
        # 1. embeddings, as ALBERT computes them (the mask is built for the rows each step runs on)
        embeddings = self.embeddings(
            input_ids, position_ids=position_ids, token_type_ids=token_type_ids, inputs_embeds=inputs_embeds
        )
        hidden = self.encoder.embedding_hidden_mapping_in(embeddings)
        # 2. the batch shrinks as examples exit, unless something needs every step of every example
        recording = any(
            kwargs.get(f"output_{name}", getattr(self.config, f"output_{name}"))
            for name in ("hidden_states", "attentions")
        )
        if early_exit and not self.training and mode in ("q_exit", "sample") and not recording:
            return self._ponder_with_early_exit(hidden, attention_mask, mode, **kwargs)
        return self._ponder_all_steps(hidden, self._mask(hidden, attention_mask), mode, **kwargs)

    # --- one step -----------------------------------------------------------------------------------

    def _apply_layer(self, hidden: torch.Tensor, mask: torch.Tensor | None, step: int, **kwargs) -> torch.Tensor:
        """Step `step` (0-based) of ALBERT's encoder loop: the layer group that step uses."""
        group = step * self.config.num_hidden_groups // self.config.num_hidden_layers
        return self.encoder.albert_layer_groups[group](hidden, mask, **kwargs)

    def _mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None):
        """The attention mask as the layers' attention implementation wants it, as ALBERT builds it."""
        return create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)

    def _pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """`(B, T, H)` -> pooled_t `(B, H)`."""
        return self.pooler_activation(self.pooler(hidden[:, 0]))

    # --- the two ways through the steps -------------------------------------------------------------

    def _ponder_all_steps(self, hidden, mask, mode: str, **kwargs) -> PalbertModelOutput:
        """Every step for every example; the exit steps are read from p by the mode's rule."""
        num_steps = self.config.num_hidden_layers
        selects_steps = mode in ("q_exit", "sample")  # "full" and "expectation" read the last step's states only
        previous = torch.zeros_like(hidden[:, 0])  # pooled_0 = 0
        step_hidden, step_pooled, lambdas = [], [], []
        for step in range(num_steps):
            hidden = self._apply_layer(hidden, mask, step, **kwargs)
            pooled = self._pool(hidden)
            if step < num_steps - 1:  # the last step exits with the remaining mass, whatever lambda_L says
                lambdas.append(torch.sigmoid(self.lambda_head(pooled, previous)))
            if selects_steps:
                step_hidden.append(hidden)
            step_pooled.append(pooled)
            previous = pooled
        lambdas = torch.stack(lambdas, dim=1) if lambdas else hidden.new_zeros(hidden.shape[0], 0)
        exit_probs = exit_distribution(lambdas)
        if not selects_steps:  # every example reads every step, and ends at step L
            exit_step = torch.full_like(exit_probs[:, 0], num_steps, dtype=torch.long)
            last_hidden, pooled_at_exit = hidden, step_pooled[-1]
        else:
            if mode == "q_exit":
                exit_step = q_exit_step(exit_probs, self.config.exit_threshold)
            else:  # "sample": exiting at t with probability lambda_t, step by step, is drawing t ~ p
                exit_step = torch.multinomial(exit_probs.detach().float(), 1).squeeze(-1) + 1
            last_hidden = select_exit_steps(step_hidden, exit_step)
            pooled_at_exit = select_exit_steps(step_pooled, exit_step)
        return PalbertModelOutput(
            last_hidden_state=last_hidden,
            pooler_output=pooled_at_exit,
            exit_step=exit_step,
            exit_probs=exit_probs,
            step_pooler_outputs=torch.stack(step_pooled, dim=1),
        )

    def _ponder_with_early_exit(self, hidden, attention_mask, mode: str, **kwargs) -> PalbertModelOutput:
        """Steps on a shrinking batch: an example leaves once it exits ("q_exit" or "sample").

        The layers' mask is rebuilt from the remaining rows of `attention_mask` when the batch shrinks: a flex
        attention `BlockMask` cannot be sliced by rows (its mask function indexes the full batch).
        """
        batch_size, num_steps = hidden.shape[0], self.config.num_hidden_layers
        mask = self._mask(hidden, attention_mask)
        last_hidden = torch.empty_like(hidden)
        pooled_at_exit = hidden.new_empty(batch_size, hidden.shape[-1])
        exit_step = torch.full((batch_size,), num_steps, dtype=torch.long, device=hidden.device)
        rows = torch.arange(batch_size, device=hidden.device)  # original index of each active row
        previous = torch.zeros_like(hidden[:, 0])  # pooled_0 = 0
        survival = hidden.new_ones(batch_size)  # prod_{j<t} (1 - lambda_j)
        cdf = hidden.new_zeros(batch_size)  # sum_{k<=t} p_k
        for step in range(num_steps):
            # 1. one application of the shared layer to the active rows only
            hidden = self._apply_layer(hidden, mask, step, **kwargs)
            pooled = self._pool(hidden)
            # 2. who exits now
            if step == num_steps - 1:
                exits = torch.ones_like(rows, dtype=torch.bool)
            elif mode == "q_exit":
                lam = torch.sigmoid(self.lambda_head(pooled, previous))
                cdf = cdf + survival * lam
                survival = survival * (1 - lam)
                exits = cdf > self.config.exit_threshold
            else:  # "sample": PonderNet's Bernoulli(lambda_t)
                exits = torch.bernoulli(torch.sigmoid(self.lambda_head(pooled, previous))).bool()
            # 3. write their results and drop them from the batch
            last_hidden[rows[exits]] = hidden[exits]
            pooled_at_exit[rows[exits]] = pooled[exits]
            exit_step[rows[exits]] = step + 1
            if bool(exits.all()):
                break
            previous = pooled
            if bool(exits.any()):
                keep = ~exits
                rows, hidden, previous = rows[keep], hidden[keep], previous[keep]
                survival, cdf = survival[keep], cdf[keep]
                if attention_mask is not None:
                    attention_mask = attention_mask[keep]
                    mask = self._mask(hidden, attention_mask)
        return PalbertModelOutput(last_hidden_state=last_hidden, pooler_output=pooled_at_exit, exit_step=exit_step)


@dataclass
class PalbertSequenceClassifierOutput(SequenceClassifierOutput):
    """Output of [`PalbertForSequenceClassification`]. B: batch, L: `num_hidden_layers` (steps).

    Args:
        loss (`torch.FloatTensor` of shape `()`, returned when `labels` are given):
            sum_t p_t L_t + beta KL(p || p_G), averaged over the labelled examples (single-label labels of -100 are
            ignored); L_t is the loss of step t's logits for the problem type (see [`PalbertForSequenceClassification`]).
        logits (`torch.FloatTensor` of shape `(B, num_labels)`):
            The prediction of the inference mode: the exit step's logits (`"q_exit"`, `"sample"`), the last
            step's (`"full"`), or the mixture over steps (`"expectation"`, see [`PalbertForSequenceClassification`]).
        hidden_states, attentions:
            Per pondering step, as [`PalbertModelOutput`] describes them.
        exit_step (`torch.LongTensor` of shape `(B,)`):
            1-based step whose output is the prediction (`"q_exit"`, `"sample"`), or L (`"full"`,
            `"expectation"`, which use every step). Without labels it is also the number of layer
            applications the example consumed.
        exit_probs (`torch.FloatTensor` of shape `(B, L)`, returned when every step ran for every example):
            The exit distribution p. `None` when examples exited early (then later steps were never computed).
    """

    exit_step: torch.LongTensor | None = None
    exit_probs: torch.FloatTensor | None = None


class PalbertForSequenceClassification(PalbertPreTrainedModel):
    r"""[`PalbertModel`] with one classifier read after every step (PALBERT, https://arxiv.org/abs/2204.03276).

    With `labels` (or in training mode) every step runs for every example, and the loss is PonderNet's
    sum_t p_t L_t + beta KL(p || p_G) (Eq. 4), L_t the per-example loss of step t's logits y_t for
    `config.problem_type`, set from the labels as in `AlbertForSequenceClassification` when it is `None`:

    - `"single_label_classification"`: cross-entropy (the paper's loss for classification); an example labelled -100
      is left out of the loss, its KL term included, and out of the mean, as `CrossEntropyLoss` leaves it out of
      ALBERT's (a batch with no other label gives NaN, as there);
    - `"regression"`: squared error (the paper's loss for STS-B, one label), averaged over the labels;
    - `"multi_label_classification"`: binary cross-entropy with logits, averaged over the labels.

    Averaging over labels makes the task term equal `AlbertForSequenceClassification`'s loss when p puts all its
    mass on one step. Regression with several labels and multi-label classification are our generalisation;
    the paper has neither. Without labels in eval mode, `"q_exit"` and `"sample"` drop exited examples from the
    batch (see [`PalbertModel`]). `"expectation"` mixes the steps' predictive distributions: log sum_t p_t
    softmax(y_t) (single-label), sum_t p_t y_t (regression), and the logit of sum_t p_t sigmoid(y_t) per label
    (multi-label, our choice); without labels and with `problem_type=None` it treats `num_labels == 1` as
    regression and more labels as single-label classification.

    Examples:

    ```python
    >>> import torch
    >>> from hf_ext import PalbertConfig, PalbertForSequenceClassification
    >>> config = PalbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_attention_heads=4,
    ...                        intermediate_size=64, num_hidden_layers=6)
    >>> model = PalbertForSequenceClassification(config).eval()
    >>> input_ids = torch.randint(5, 100, (3, 8))
    >>> out = model(input_ids)
    >>> out.logits.shape, out.exit_step.shape
    (torch.Size([3, 2]), torch.Size([3]))
    >>> out = model(input_ids, labels=torch.tensor([0, 1, 1]))  # integer labels: single-label classification
    >>> out.loss.ndim, torch.allclose(out.exit_probs.sum(-1), torch.ones(3)), model.config.problem_type
    (0, True, 'single_label_classification')

    ```
    """

    def __init__(self, config: PalbertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.albert = PalbertModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inference_mode: str | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> PalbertSequenceClassifierOutput:
        r"""
        Args:
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds: as in ALBERT.
            labels (`torch.Tensor` of shape `(B,)` or `(B, num_labels)`, *optional*):
                Class indices `(B,)` (single-label), float targets `(B,)` or `(B, num_labels)` (regression), or
                multi-hot float targets `(B, num_labels)` (multi-label), as in `AlbertForSequenceClassification`.
                When given, every step runs for every example and the pondering loss is returned.
            inference_mode (`str`, *optional*):
                Overrides `config.inference_mode` for this call: `"q_exit"`, `"sample"`, `"expectation"` or `"full"`.
            kwargs: `output_hidden_states`, `output_attentions`, `return_dict`, as in ALBERT.

        Returns:
            [`PalbertSequenceClassifierOutput`].
        """
        mode = _resolve_inference_mode(self.config, inference_mode)
        batch_size = _batch_size(input_ids, inputs_embeds)
        problem_type = None if labels is None else self._problem_type(labels, batch_size)
        # 1. pondering; with labels every step runs for every example, as the loss reads them all
        outputs = self.albert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            inference_mode=mode,
            early_exit=labels is None,
            return_dict=True,
            **kwargs,
        )
        # 2. the prediction, and the loss from every step's logits
        loss = None
        if outputs.step_pooler_outputs is None:  # examples left the batch: only their exit steps were read
            logits = self.classifier(self.dropout(outputs.pooler_output))
        else:
            step_logits = self.classifier(self.dropout(outputs.step_pooler_outputs))  # (B, L, C)
            logits = self._predict(step_logits, outputs.exit_probs, outputs.exit_step, mode)
            if labels is not None:
                loss = self._pondering_loss(step_logits, outputs.exit_probs, labels, problem_type)
        return PalbertSequenceClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            exit_step=outputs.exit_step,
            exit_probs=outputs.exit_probs,
        )

    def _problem_type(self, labels: torch.Tensor, batch_size: int) -> str:
        """`config.problem_type`, set from the labels as `AlbertForSequenceClassification` does when it is `None`,
        after checking the labels' shape and type for it."""
        problem_type = self.config.problem_type
        if problem_type is None:
            if self.num_labels == 1:
                problem_type = "regression"
            elif self.num_labels > 1 and (labels.dtype == torch.long or labels.dtype == torch.int):
                problem_type = "single_label_classification"
            else:
                problem_type = "multi_label_classification"
        got = f"got shape {tuple(labels.shape)} and dtype {labels.dtype}"
        if problem_type == "single_label_classification":
            if labels.is_floating_point() or labels.numel() != batch_size:
                raise ValueError(
                    f"`labels` must be class indices, an integer tensor of shape ({batch_size},), for "
                    f"problem_type='single_label_classification'; {got}."
                )
        elif labels.numel() != batch_size * self.num_labels:
            one_target = problem_type == "regression" and self.num_labels == 1
            expected = (batch_size,) if one_target else (batch_size, self.num_labels)
            raise ValueError(f"`labels` must have shape {expected} for problem_type={problem_type!r}; {got}.")
        self.config.problem_type = problem_type  # as AlbertForSequenceClassification does
        return problem_type

    def _predict(self, step_logits, exit_probs, exit_step, mode: str) -> torch.Tensor:
        """The mode's prediction `(B, C)` from every step's logits `(B, L, C)`, p `(B, L)` and the exit steps."""
        if mode != "expectation":
            return step_logits[torch.arange(step_logits.shape[0], device=step_logits.device), exit_step - 1]
        problem_type = self.config.problem_type or (
            "regression" if self.num_labels == 1 else "single_label_classification"
        )
        if problem_type == "regression":  # sum_t p_t y_t
            return (exit_probs.unsqueeze(-1) * step_logits).sum(1)
        log_p = exit_probs.log().unsqueeze(-1)  # (B, L, 1); in log space, as p_t may be 0
        if problem_type == "single_label_classification":  # log sum_t p_t softmax(y_t)
            return torch.logsumexp(log_p + step_logits.log_softmax(-1), dim=1)
        # multi-label: logit of P = sum_t p_t sigmoid(y_t), per label; 1 - P = sum_t p_t sigmoid(-y_t)
        log_yes = torch.logsumexp(log_p + F.logsigmoid(step_logits), dim=1)
        return log_yes - torch.logsumexp(log_p + F.logsigmoid(-step_logits), dim=1)

    def _pondering_loss(self, step_logits, exit_probs, labels, problem_type: str) -> torch.Tensor:
        """sum_t p_t L_t + beta KL(p || p_G) per example (PonderNet Eq. 4; L_t per example `(B, L)`), averaged over the
        labelled examples."""
        batch_size, num_steps = exit_probs.shape
        if problem_type == "regression":
            targets = labels.reshape(batch_size, 1, self.num_labels).to(step_logits.dtype)
            per_step = ((step_logits - targets) ** 2).mean(-1)
        elif problem_type == "single_label_classification":
            targets = labels.reshape(batch_size, 1).expand(-1, num_steps)
            per_step = F.cross_entropy(step_logits.transpose(1, 2), targets, reduction="none")
        else:  # multi_label_classification
            targets = labels.unsqueeze(1).expand_as(step_logits).to(step_logits.dtype)
            per_step = F.binary_cross_entropy_with_logits(step_logits, targets, reduction="none").mean(-1)
        prior = truncated_geometric_prior(
            self.config.prior_lambda, num_steps, dtype=exit_probs.dtype, device=exit_probs.device
        )
        per_example = (exit_probs * per_step).sum(-1) + self.config.beta * kl_to_prior(exit_probs, prior)
        if problem_type != "single_label_classification":
            return per_example.mean()
        # CrossEntropyLoss's ignore_index: an unlabelled example has no task loss, and its KL term would pull p
        # towards the prior with nothing to balance it, so it leaves the loss and the mean whole.
        labelled = labels.reshape(batch_size) != -100
        return torch.where(labelled, per_example, 0.0).sum() / labelled.sum()


__all__ = [
    "PalbertForSequenceClassification",
    "PalbertLambdaHead",
    "PalbertModel",
    "PalbertModelOutput",
    "PalbertPreTrainedModel",
    "PalbertSequenceClassifierOutput",
    "exit_distribution",
    "kl_to_prior",
    "q_exit_step",
    "select_exit_steps",
    "truncated_geometric_prior",
]
