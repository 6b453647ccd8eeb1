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
The modules are ALBERT's own (`AlbertModel`), so any ALBERT checkpoint initialises the encoder.
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AlbertConfig, AlbertModel, AlbertPreTrainedModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils.generic import can_return_tuple

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
    """ALBERT's weight initialisation and loading, for PALBERT's config."""

    config: PalbertConfig


@dataclass
class PalbertSequenceClassifierOutput(SequenceClassifierOutput):
    """Output of [`PalbertForSequenceClassification`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, returned when `labels` are given):
            sum_t p_t L(y_t, y) + beta KL(p || p_G), averaged over the batch.
        logits (`torch.FloatTensor` of shape `(B, num_labels)`):
            The prediction of the inference mode: the exit step's logits (`"q_exit"`, `"sample"`), the last
            step's (`"full"`), or log sum_t p_t softmax(y_t) (`"expectation"`; sum_t p_t y_t for regression).
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
    r"""ALBERT with a PonderNet exit head: one shared classifier read after every application of the shared
    layer, and per-example early exit at inference (PALBERT, https://arxiv.org/abs/2204.03276).

    In training, or whenever `labels` are given, every step runs for every example and the loss is
    sum_t p_t L(y_t, y) + beta KL(p || p_G) (cross-entropy, or squared error when `num_labels == 1`).
    Without labels, the `"q_exit"` and `"sample"` modes drop exited examples from the batch, so each
    example costs only its own number of steps and gets the same result as when run alone.

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
    >>> out = model(input_ids, labels=torch.tensor([0, 1, 1]))
    >>> out.loss.ndim, torch.allclose(out.exit_probs.sum(-1), torch.ones(3))
    (0, True)

    ```
    """

    def __init__(self, config: PalbertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.albert = AlbertModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.lambda_head = PalbertLambdaHead(config)
        self.post_init()

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
    ) -> "PalbertForSequenceClassification":
        """Build PALBERT from an ALBERT checkpoint: embeddings, shared layer and pooler reused, exit head new.

        A classifier saved in the checkpoint (`AlbertForSequenceClassification`) is reused when its shape
        matches `num_labels`, and initialised anew otherwise.

        Args:
            pretrained_model_name_or_path: a Hub id (`"albert/albert-base-v2"`) or a local folder of an ALBERT
                checkpoint (`model_type` "albert").
            cache_dir, revision, token, local_files_only: as in `from_pretrained`.
            config_kwargs: [`PalbertConfig`] fields overriding the checkpoint's (`num_labels`, `exit_threshold`,
                `beta`, `hidden_dropout_prob`, ...).

        Returns:
            A `PalbertForSequenceClassification` in eval mode, as `from_pretrained` returns it.

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
        # ignore_mismatched_sizes: a saved classifier with another label count is replaced by a new one.
        return cls.from_pretrained(
            pretrained_model_name_or_path, config=config, ignore_mismatched_sizes=True, **hub_kwargs
        )

    # --- one step -----------------------------------------------------------------------------------

    def _embed(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds):
        """Embeddings projected to the hidden size `(B, T, H)`, and ALBERT's attention mask."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of `input_ids` and `inputs_embeds`.")
        embeddings = self.albert.embeddings(
            input_ids, position_ids=position_ids, token_type_ids=token_type_ids, inputs_embeds=inputs_embeds
        )
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=embeddings, attention_mask=attention_mask)
        return self.albert.encoder.embedding_hidden_mapping_in(embeddings), mask

    def _apply_layer(self, hidden: torch.Tensor, mask: torch.Tensor | None, step: int) -> torch.Tensor:
        """Step `step` (0-based) of ALBERT's encoder loop: the layer group that step uses."""
        group = step * self.config.num_hidden_groups // self.config.num_hidden_layers
        return self.albert.encoder.albert_layer_groups[group](hidden, mask)

    def _read_out(self, hidden: torch.Tensor, previous_pooled: torch.Tensor):
        """`(B, T, H)` -> pooled_t `(B, H)`, logits y_t `(B, C)` and the exit logit of lambda_t `(B,)`."""
        pooled = self.albert.pooler_activation(self.albert.pooler(hidden[:, 0]))
        logits = self.classifier(self.dropout(pooled))
        return pooled, logits, self.lambda_head(pooled, previous_pooled)

    # --- the two ways through the steps -------------------------------------------------------------

    def _run_all_steps(self, hidden, mask):
        """Every step for every example: per-step logits `(B, L, C)` and lambdas `(B, L - 1)`."""
        num_steps = self.config.num_hidden_layers
        previous = torch.zeros_like(hidden[:, 0])  # pooled_0 = 0
        step_logits, lambdas = [], []
        for step in range(num_steps):
            hidden = self._apply_layer(hidden, mask, step)
            previous, logits, exit_logit = self._read_out(hidden, previous)
            step_logits.append(logits)
            if step < num_steps - 1:  # the last step exits with the remaining mass, whatever lambda_L says
                lambdas.append(torch.sigmoid(exit_logit))
        lambdas = torch.stack(lambdas, dim=1) if lambdas else hidden.new_zeros(hidden.shape[0], 0)
        return torch.stack(step_logits, dim=1), lambdas

    def _run_with_early_exit(self, hidden, mask, mode: str):
        """Steps on a shrinking batch: an example leaves once it exits ("q_exit" or "sample").

        Returns the exit step's logits `(B, C)` and the exit steps `(B,)`, 1-based.
        """
        batch_size, num_steps = hidden.shape[0], self.config.num_hidden_layers
        out_logits = hidden.new_empty(batch_size, self.num_labels)
        exit_step = torch.full((batch_size,), num_steps, dtype=torch.long, device=hidden.device)
        rows = torch.arange(batch_size, device=hidden.device)  # original index of each active row
        previous = torch.zeros_like(hidden[:, 0])  # pooled_0 = 0
        survival = hidden.new_ones(batch_size)  # prod_{j<t} (1 - lambda_j)
        cdf = hidden.new_zeros(batch_size)  # sum_{k<=t} p_k
        for step in range(num_steps):
            # 1. one application of the shared layer to the active rows only
            hidden = self._apply_layer(hidden, mask, step)
            previous, logits, exit_logit = self._read_out(hidden, previous)
            # 2. who exits now
            if step == num_steps - 1:
                exits = torch.ones_like(rows, dtype=torch.bool)
            elif mode == "q_exit":
                lam = torch.sigmoid(exit_logit)
                cdf = cdf + survival * lam
                survival = survival * (1 - lam)
                exits = cdf > self.config.exit_threshold
            else:  # "sample": PonderNet's Bernoulli(lambda_t)
                exits = torch.bernoulli(torch.sigmoid(exit_logit)).bool()
            # 3. write their results and drop them from the batch
            out_logits[rows[exits]] = logits[exits]
            exit_step[rows[exits]] = step + 1
            if bool(exits.all()):
                break
            if bool(exits.any()):
                keep = ~exits
                rows, hidden, previous = rows[keep], hidden[keep], previous[keep]
                survival, cdf = survival[keep], cdf[keep]
                mask = None if mask is None else mask[keep]
        return out_logits, exit_step

    # --- predictions and loss from all steps --------------------------------------------------------

    def _predict(self, step_logits: torch.Tensor, exit_probs: torch.Tensor, mode: str):
        """The mode's prediction `(B, C)` and step `(B,)` from every step's logits `(B, L, C)` and p `(B, L)`."""
        batch_size, num_steps = exit_probs.shape
        if mode in ("full", "expectation"):
            exit_step = torch.full((batch_size,), num_steps, dtype=torch.long, device=exit_probs.device)
            if mode == "full":
                return step_logits[:, -1], exit_step
            if self.num_labels == 1:
                return (exit_probs.unsqueeze(-1) * step_logits).sum(1), exit_step
            # log sum_t p_t softmax(y_t), in log space: p_t may be 0
            return torch.logsumexp(exit_probs.log().unsqueeze(-1) + step_logits.log_softmax(-1), dim=1), exit_step
        if mode == "q_exit":
            exit_step = q_exit_step(exit_probs, self.config.exit_threshold)
        else:  # "sample": exiting at t with probability lambda_t, step by step, is drawing t ~ p
            exit_step = torch.multinomial(exit_probs.detach().float(), 1).squeeze(-1) + 1
        return step_logits[torch.arange(batch_size, device=step_logits.device), exit_step - 1], exit_step

    def _pondering_loss(self, step_logits: torch.Tensor, exit_probs: torch.Tensor, labels: torch.Tensor):
        """sum_t p_t L(y_t, y) + beta KL(p || p_G), averaged over the batch (PonderNet Eq. 4)."""
        num_steps = exit_probs.shape[1]
        if self.num_labels == 1:  # regression: squared error of every step's prediction
            per_step = (step_logits.squeeze(-1) - labels.view(-1, 1).to(step_logits.dtype)) ** 2  # (B, L)
        else:
            targets = labels.view(-1, 1).expand(-1, num_steps)
            per_step = F.cross_entropy(step_logits.transpose(1, 2), targets, reduction="none")  # (B, L)
        prior = truncated_geometric_prior(
            self.config.prior_lambda, num_steps, dtype=exit_probs.dtype, device=exit_probs.device
        )
        task_loss = (exit_probs * per_step).sum(-1).mean()
        return task_loss + self.config.beta * kl_to_prior(exit_probs, prior).mean()

    def _check_labels(self, labels: torch.Tensor, batch_size: int) -> None:
        if labels.numel() != batch_size:
            raise ValueError(
                f"`labels` must hold one value per example ({batch_size}), got shape {tuple(labels.shape)}."
            )
        if self.num_labels > 1 and labels.is_floating_point():
            raise ValueError(
                f"`labels` must be class indices (an integer tensor) for num_labels={self.num_labels}, "
                f"got {labels.dtype}; for regression set num_labels=1."
            )

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
    ) -> PalbertSequenceClassifierOutput:
        r"""
        Args:
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds: as in ALBERT.
            labels (`torch.Tensor` of shape `(B,)`, *optional*):
                Class indices, or float targets when `num_labels == 1` (regression). When given, every step runs
                for every example and the pondering loss is returned.
            inference_mode (`str`, *optional*):
                Overrides `config.inference_mode` for this call: `"q_exit"`, `"sample"`, `"expectation"` or `"full"`.

        Returns:
            [`PalbertSequenceClassifierOutput`].
        """
        mode = self.config.inference_mode if inference_mode is None else inference_mode
        if mode not in INFERENCE_MODES:
            raise ValueError(f"`inference_mode` must be one of {INFERENCE_MODES}, got {mode!r}.")
        # 1. embeddings, as ALBERT computes them
        hidden, mask = self._embed(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)
        if labels is not None:
            self._check_labels(labels, hidden.shape[0])
        # 2. no loss to compute: exited examples stop consuming compute
        if labels is None and mode in ("q_exit", "sample"):
            logits, exit_step = self._run_with_early_exit(hidden, mask, mode)
            return PalbertSequenceClassifierOutput(logits=logits, exit_step=exit_step)
        # 3. every step for every example, then the mode's prediction and the loss
        step_logits, lambdas = self._run_all_steps(hidden, mask)
        exit_probs = exit_distribution(lambdas)
        logits, exit_step = self._predict(step_logits, exit_probs, mode)
        loss = None if labels is None else self._pondering_loss(step_logits, exit_probs, labels)
        return PalbertSequenceClassifierOutput(loss=loss, logits=logits, exit_step=exit_step, exit_probs=exit_probs)


__all__ = [
    "PalbertForSequenceClassification",
    "PalbertLambdaHead",
    "PalbertPreTrainedModel",
    "PalbertSequenceClassifierOutput",
    "exit_distribution",
    "kl_to_prior",
    "q_exit_step",
    "truncated_geometric_prior",
]
