"""AoT P-Tuning layers: per-token biases added before a Transformer layer (arXiv 2305.10835; abstract, Fig. 2).

A wrapped layer l computes ``base_layer(H + P_l[x])``, with ``H`` the hidden states ``[B, T, d]`` that enter
the layer and ``x`` the token ids ``[B, T]`` of the same positions. ``P_l`` is a ``|V| x d`` table produced by a
reparametrization while training and computed once ("collapsed") for inference, where a layer then costs one
row gather and one add.

The token ids reach the layers through `AoTTokenIds`: a forward pre-hook on the input embedding of the layers'
stack stores the ids that the embedding is about to look up, so with a KV cache each generated position uses its
own id (an encoder-decoder has two stacks, each with its own embedding module and ids).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

# `init_weights=False`: the standard deviation of the otherwise zero last factor (BERT's initializer_range).
NON_IDENTITY_INIT_STD = 0.02


class AoTTokenIds:
    """The token ids of the forward pass in progress, shared by the AoT layers of one stack.

    `reset` runs before the stack's forward (so ids from an earlier call are never reused) and `capture` before
    its input embedding's forward. The ids are one attribute: a model serves one forward pass at a time (as
    PEFT's mixed-batch hooks also assume). It is a plain object, not a module: the embedding stays owned by the
    model.

    Args:
        embedding: the stack's input embedding; its frozen weight is the matrix ``E`` of the FC reparametrization.
        vocab_size: rows |V| of the AoT tables, the allowed ids. Not read from the embedding at each call, since
            `resize_token_embeddings` grows the embedding in place while the tables keep their rows.
    """

    def __init__(self, embedding: nn.Embedding, vocab_size: int):
        self.embedding = embedding
        self.vocab_size = vocab_size
        self.input_ids: torch.Tensor | None = None
        self.handles: list = []

    def install(self, stack: nn.Module) -> None:
        """Hook `reset` before ``stack``'s forward (the model, or an encoder-decoder's encoder or decoder) and
        `capture` before the embedding's."""
        self.handles = [
            stack.register_forward_pre_hook(self.reset, with_kwargs=True),
            self.embedding.register_forward_pre_hook(self.capture, with_kwargs=True),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def reset(self, module, args, kwargs) -> None:
        self.input_ids = None

    def capture(self, module, args, kwargs) -> None:
        input_ids = args[0] if args else kwargs["input"]
        vocab_size = self.vocab_size
        # Checked here, once per forward, so that a bad id gives this message rather than a CUDA device assert.
        out_of_range = (input_ids < 0) | (input_ids >= vocab_size)
        if out_of_range.any():
            bad = input_ids[out_of_range][0].item()
            raise ValueError(
                f"`input_ids` holds the token id {bad}, outside the AoT P-Tuning tables of {vocab_size} rows "
                f"(allowed: 0 to {vocab_size - 1})."
            )
        self.input_ids = input_ids

    def for_hidden_states(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The ids ``[B, T]`` of the positions in ``hidden_states`` ``[B, T, d]``."""
        if self.input_ids is None:
            raise ValueError(
                "AoT P-Tuning adds a bias chosen by each position's token id, but this forward pass did not run the "
                "input embedding on `input_ids` (was it called with `inputs_embeds` only?). Pass `input_ids`."
            )
        if self.input_ids.shape != hidden_states.shape[:-1]:
            raise ValueError(
                f"The token ids seen by the input embedding have shape {tuple(self.input_ids.shape)}, but the hidden "
                f"states entering an AoT layer have shape {tuple(hidden_states.shape)}: AoT P-Tuning needs one token "
                "id per position."
            )
        return self.input_ids


class AoTTable(nn.Module):
    """A reparametrization of a layer's table ``P`` (|V| x d): `rows` gives ``P[x]``, `table` the whole ``P``.

    `collapsed` holds ``P`` once `AoTPTuningLayer.collapse` computed it for inference (a buffer, so it follows
    the model's device and dtype moves; not saved), else None.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("collapsed", None, persistent=False)

    def rows(self, token_ids: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        """Rows ``P[x]`` ``[..., d]`` for the ids ``x``."""
        raise NotImplementedError

    def table(self, embedding_weight: torch.Tensor) -> torch.Tensor:
        """The whole table ``P`` ``[V, d]``."""
        raise NotImplementedError


class AoTFCTable(AoTTable):
    """FC reparametrization ``P = relu(E W1 + b1) W2 + b2`` over the frozen input embeddings ``E``.

    The paper (§1, contributions) passes "a LM's embeddings matrix" through "a trainable Fully Connected network";
    the formula's details are NOT VERIFIED (its §3 was not readable): the biases, ``f`` = ReLU, and the init.
    Our choices: ``W2`` and ``b2`` start at zero (with `init_weights`), so ``P = 0`` and the adapted
    model starts as the base model; ``W1`` starts from N(0, 1 / (d_emb · var(E))), so that the columns of ``E W1``
    have unit variance whatever the scale of the embeddings (``W2`` then gets useful gradients from the start).
    """

    def __init__(self, embedding_weight: torch.Tensor, hidden_size: int, out_dim: int, init_weights: bool = True):
        super().__init__()
        embedding_dim = embedding_weight.shape[1]
        self.in_weight = nn.Parameter(torch.empty(embedding_dim, hidden_size))  # W1
        self.in_bias = nn.Parameter(torch.zeros(hidden_size))  # b1
        self.out_weight = nn.Parameter(_last_factor(hidden_size, out_dim, init_weights=init_weights))  # W2
        self.out_bias = nn.Parameter(_last_factor(out_dim, init_weights=init_weights))  # b2
        embedding_std = embedding_weight.detach().float().std().clamp_min(1e-6).item()
        nn.init.normal_(self.in_weight, std=1.0 / (math.sqrt(embedding_dim) * embedding_std))

    def rows(self, token_ids: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        """Rows ``P[x]`` ``[..., d]`` for ids ``x``; gathering ``E[x]`` first gives the same rows at batch cost."""
        embedded = embedding_weight.detach()[token_ids].to(self.in_weight.dtype)  # E is frozen
        return F.relu(embedded @ self.in_weight + self.in_bias) @ self.out_weight + self.out_bias

    def table(self, embedding_weight: torch.Tensor) -> torch.Tensor:
        return self.rows(torch.arange(embedding_weight.shape[0], device=embedding_weight.device), embedding_weight)


class AoTKroneckerTable(AoTTable):
    """Kronecker reparametrization ``P = (WL ⊗ WM) WR``: the paper's "factorized matrix trained from scratch" (§1).

    The factor shapes and the init below are NOT VERIFIED (the paper's §3 was not readable).

    ``WL`` and ``WM`` are ``a x r`` with ``a = ceil(sqrt(|V|))``, so ``WL ⊗ WM`` has ``a² >= |V|`` rows; row
    ``x = i a + j`` of it is the outer product ``WL[i] ⊗ WM[j]`` flattened, and rows past |V| are never used.
    ``WR`` (r² x d) starts at zero (our choice, with `init_weights`, so the adapted model starts as the base model);
    ``WL`` and ``WM`` start from N(0, 1/r) so a row of ``WL ⊗ WM`` has about unit norm.
    """

    def __init__(self, vocab_size: int, rank: int, out_dim: int, init_weights: bool = True):
        super().__init__()
        self.side = math.ceil(math.sqrt(vocab_size))
        self.vocab_size = vocab_size
        self.left = nn.Parameter(torch.randn(self.side, rank) / math.sqrt(rank))  # WL
        self.middle = nn.Parameter(torch.randn(self.side, rank) / math.sqrt(rank))  # WM
        self.right = nn.Parameter(_last_factor(rank * rank, out_dim, init_weights=init_weights))  # WR

    def rows(self, token_ids: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        left = self.left[token_ids // self.side]  # [..., r]
        middle = self.middle[token_ids % self.side]  # [..., r]
        kronecker_rows = (left.unsqueeze(-1) * middle.unsqueeze(-2)).flatten(-2)  # [..., r*r]
        return kronecker_rows @ self.right

    def table(self, embedding_weight: torch.Tensor) -> torch.Tensor:
        return self.rows(torch.arange(self.vocab_size, device=self.left.device), embedding_weight)


class AoTRawTable(AoTTable):
    """No reparametrization: ``P`` is trained directly, from zero (with `init_weights`). Also the form of loaded
    collapsed tables. It is its own collapsed form: `collapse` leaves it as it is."""

    def __init__(self, vocab_size: int, out_dim: int, init_weights: bool = True):
        super().__init__()
        self.table_weight = nn.Parameter(_last_factor(vocab_size, out_dim, init_weights=init_weights))

    def rows(self, token_ids: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.table_weight)

    def table(self, embedding_weight: torch.Tensor) -> torch.Tensor:
        return self.table_weight


def _last_factor(*shape: int, init_weights: bool) -> torch.Tensor:
    """The last factor of a reparametrization: zeros (identity adapter), or N(0, 0.02²) with `init_weights=False`."""
    if init_weights:
        return torch.zeros(shape)
    return torch.randn(shape) * NON_IDENTITY_INIT_STD


def build_table(config, embedding_weight: torch.Tensor, hidden_size: int) -> AoTTable:
    """The reparametrization module that `config.reparametrization` names."""
    vocab_size = embedding_weight.shape[0]
    if config.reparametrization == "fc":
        return AoTFCTable(embedding_weight, config.fc_hidden_size, hidden_size, config.init_weights)
    if config.reparametrization == "kronecker":
        return AoTKroneckerTable(vocab_size, config.kronecker_rank, hidden_size, config.init_weights)
    return AoTRawTable(vocab_size, hidden_size, config.init_weights)


def _rows_by_adapter(adapter_names: list[str], batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """The row indices of ``batch`` that each adapter in ``adapter_names`` (one name per example) takes, on
    ``batch``'s device, in order of first appearance."""
    if len(adapter_names) != batch.shape[0]:
        raise ValueError(
            f"`adapter_names` must name one adapter per example: got {len(adapter_names)} names for a batch "
            f"of {batch.shape[0]}."
        )
    return {
        name: torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=batch.device)
        for name in dict.fromkeys(adapter_names)
    }

class AoTPTuningLayer(nn.Module, BaseTunerLayer):
    """A Transformer layer with AoT P-Tuning biases added to its input hidden states.

    Args:
        base_layer: the wrapped Transformer layer; its first argument (or `hidden_states=`) is ``H`` ``[B, T, d]``.
        token_ids: the `AoTTokenIds` of the layer's stack.
    """

    adapter_layer_names = ("aot_reparam",)

    def __init__(self, base_layer: nn.Module, token_ids: AoTTokenIds):
        super().__init__()
        self.base_layer = base_layer
        self.aot_reparam = nn.ModuleDict()  # adapter -> AoTTable
        self.token_ids = token_ids
        self.merged_adapters = []

    def update_layer(self, adapter_name: str, config, hidden_size: int) -> None:
        """Add the reparametrization of adapter `adapter_name` on the device and in the dtype of the base layer's
        weights, as PEFT's layers do (PEFT then upcasts float16/bfloat16 adapters to float32 unless
        `autocast_adapter_dtype=False`)."""
        table = build_table(config, self.token_ids.embedding.weight, hidden_size)
        if not any(p.is_meta for p in table.parameters()):  # meta (low_cpu_mem_usage): the loaded weights land later
            weight = next(self.base_layer.parameters())
            table = table.to(weight.device, dtype=weight.dtype if weight.is_floating_point() else None)
        self.aot_reparam[adapter_name] = table
        self.set_adapter(self.active_adapters)

    def is_collapsed(self) -> bool:
        """Whether any adapter of this layer has a collapsed table."""
        return any(reparam.collapsed is not None for reparam in self.aot_reparam.values())

    @torch.no_grad()
    def collapse(self, adapter_name: str) -> None:
        """Compute the table ``P_l`` of `adapter_name` once, in the dtype of the base layer, for inference."""
        reparam = self.aot_reparam[adapter_name]
        if isinstance(reparam, AoTRawTable):
            return  # already a table: looking it up costs the same gather
        dtype = next(self.base_layer.parameters()).dtype
        reparam.collapsed = reparam.table(self.token_ids.embedding.weight).to(dtype)

    def uncollapse(self, adapter_name: str) -> None:
        """Drop the collapsed table of `adapter_name`: its reparametrization runs again."""
        self.aot_reparam[adapter_name].collapsed = None

    def bias(self, adapter_name: str, token_ids: torch.Tensor) -> torch.Tensor:
        """``P_l[x]`` ``[..., d]`` of `adapter_name` for token ids ``x``: one gather from the collapsed table, or
        the reparametrization's rows.

        Raises:
            RuntimeError: the table is collapsed, but autograd is recording and the adapter's weights require
                gradients, which the collapsed table (computed without a graph) would silently withhold.
        """
        reparam = self.aot_reparam[adapter_name]
        if reparam.collapsed is None:
            return reparam.rows(token_ids, self.token_ids.embedding.weight)
        if torch.is_grad_enabled() and any(p.requires_grad for p in reparam.parameters()):
            raise RuntimeError(
                f"The AoT P-Tuning adapter {adapter_name!r} is collapsed for inference, but this forward pass records "
                "gradients for its weights, which the collapsed tables cannot give. Run inference under "
                "`torch.no_grad()` or `torch.inference_mode()`, or call `uncollapse()` to train."
            )
        return F.embedding(token_ids, reparam.collapsed)

    def _mixed_batch_bias(self, hidden_states: torch.Tensor, token_ids: torch.Tensor, adapter_names) -> torch.Tensor:
        """Bias ``[B, T, d]`` where example b uses adapter ``adapter_names[b]`` (``"__base__"``: none).

        As PEFT's LoRA does for mixed batches, the examples of each adapter are one sub-batch: its rows are
        gathered and copied into place (with 4 interleaved adapters about 2x the gather of a one-adapter batch,
        see BENCHMARKS.md).
        """
        bias = torch.empty_like(hidden_states)
        for adapter_name, rows in _rows_by_adapter(adapter_names, hidden_states).items():
            if adapter_name in self.aot_reparam:
                part = self.bias(adapter_name, token_ids.index_select(0, rows))  # [n, T, d]
                bias.index_copy_(0, rows, part.to(bias.dtype))
            else:
                bias.index_fill_(0, rows, 0)  # "__base__", or an adapter that does not target this layer
        return bias

    def forward(self, hidden_states: torch.Tensor, *args, adapter_names: list[str] | None = None, **kwargs):
        if self.disable_adapters:
            return self.base_layer(hidden_states, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.aot_reparam]
        if adapter_names is None and not active:
            return self.base_layer(hidden_states, *args, **kwargs)
        token_ids = self.token_ids.for_hidden_states(hidden_states)  # [B, T]
        if adapter_names is not None:
            bias = self._mixed_batch_bias(hidden_states, token_ids, adapter_names)
        else:
            bias = self.bias(active[0], token_ids)
            for name in active[1:]:
                bias = bias + self.bias(name, token_ids)
        # H_l <- H_l + P_l[x] (the bias before the layer, paper Fig. 2), then the layer itself. In place: `bias` is
        # always a fresh tensor here, and a second [B, T, d] buffer costs as much as the gather itself.
        return self.base_layer(bias.to(hidden_states.dtype).add_(hidden_states), *args, **kwargs)

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names) -> nn.Module:
        # merge=True is refused earlier, by AoTPTuningModel._check_merge_allowed
        return self.base_layer

    def __repr__(self) -> str:
        return "aot_ptuning." + super().__repr__()


__all__ = [
    "AoTFCTable", "AoTKroneckerTable", "AoTPTuningLayer", "AoTRawTable", "AoTTable", "AoTTokenIds", "build_table"
]
