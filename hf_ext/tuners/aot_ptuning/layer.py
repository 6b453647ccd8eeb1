"""AoT P-Tuning layers: per-token biases added before a Transformer layer (arXiv 2305.10835; abstract, Fig. 2).

A wrapped layer l computes ``base_layer(H + P_l[x])``, with ``H`` the hidden states ``[B, T, d]`` that enter
the layer and ``x`` the token ids ``[B, T]`` of the same positions. ``P_l`` is a ``|V| x d`` table produced by a
reparametrization while training and computed once ("collapsed") for inference, where a layer then costs one
row gather and one add.

The token ids reach the layers through `AoTTokenIds`: a forward pre-hook on the model's input embedding stores
the ids that the embedding is about to look up, so with a KV cache each generated position uses its own id.
"""

from __future__ import annotations

import itertools
import math
import threading

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


class AoTTokenIds:
    """The token ids of the forward pass in progress, shared by the AoT layers of one model.

    `reset` runs before the model's forward (so ids from an earlier call are never reused) and `capture` before
    its input embedding's forward. The ids are kept per thread, so threads serving one model never see each
    other's ids. It is a plain object, not a module: the embedding stays owned by the model.

    Args:
        embedding: the model's input embedding; its frozen weight is the matrix ``E`` of the FC reparametrization.
        vocab_size: rows |V| of the AoT tables, the allowed ids. Not read from the embedding at each call, since
            `resize_token_embeddings` grows the embedding in place while the tables keep their rows.
    """

    def __init__(self, embedding: nn.Embedding, vocab_size: int):
        self.embedding = embedding
        self.vocab_size = vocab_size
        self._local = threading.local()
        self.handles: list = []

    @property
    def input_ids(self) -> torch.Tensor | None:
        """The ids ``[B, T]`` captured in this thread's forward pass in progress, or None."""
        return getattr(self._local, "input_ids", None)

    @input_ids.setter
    def input_ids(self, input_ids: torch.Tensor | None) -> None:
        self._local.input_ids = input_ids

    def __getstate__(self) -> dict:  # `copy.deepcopy(model)`: a thread-local cannot be copied, nor needs to be
        return {key: value for key, value in self.__dict__.items() if key != "_local"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def install(self, model: nn.Module) -> None:
        self.handles = [
            model.register_forward_pre_hook(self.reset, with_kwargs=True),
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


class AoTFCTable(nn.Module):
    """FC reparametrization ``P = relu(E W1 + b1) W2 + b2`` over the frozen input embeddings ``E``.

    The paper (§1, contributions) passes "a LM's embeddings matrix" through "a trainable Fully Connected network";
    the formula's details are NOT VERIFIED (its §3 was not readable): the biases, ``f`` = ReLU, and the init.
    Our choices: ``W2`` and ``b2`` start at zero, so ``P = 0`` and the adapted
    model starts as the base model; ``W1`` starts from N(0, 1 / (d_emb · var(E))), so that the columns of ``E W1``
    have unit variance whatever the scale of the embeddings (``W2`` then gets useful gradients from the start).
    """

    def __init__(self, embedding_weight: torch.Tensor, hidden_size: int, out_dim: int):
        super().__init__()
        embedding_dim = embedding_weight.shape[1]
        self.in_weight = nn.Parameter(torch.empty(embedding_dim, hidden_size))  # W1
        self.in_bias = nn.Parameter(torch.zeros(hidden_size))  # b1
        self.out_weight = nn.Parameter(torch.zeros(hidden_size, out_dim))  # W2
        self.out_bias = nn.Parameter(torch.zeros(out_dim))  # b2
        embedding_std = embedding_weight.detach().float().std().clamp_min(1e-6).item()
        nn.init.normal_(self.in_weight, std=1.0 / (math.sqrt(embedding_dim) * embedding_std))

    def rows(self, token_ids: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        """Rows ``P[x]`` ``[..., d]`` for ids ``x``; gathering ``E[x]`` first gives the same rows at batch cost."""
        embedded = embedding_weight.detach()[token_ids].to(self.in_weight.dtype)  # E is frozen
        return F.relu(embedded @ self.in_weight + self.in_bias) @ self.out_weight + self.out_bias

    def table(self, embedding_weight: torch.Tensor) -> torch.Tensor:
        """The whole table ``P`` ``[V, d]``."""
        return self.rows(torch.arange(embedding_weight.shape[0], device=embedding_weight.device), embedding_weight)


class AoTKroneckerTable(nn.Module):
    """Kronecker reparametrization ``P = (WL ⊗ WM) WR``: the paper's "factorized matrix trained from scratch" (§1).

    The factor shapes and the init below are NOT VERIFIED (the paper's §3 was not readable).

    ``WL`` and ``WM`` are ``a x r`` with ``a = ceil(sqrt(|V|))``, so ``WL ⊗ WM`` has ``a² >= |V|`` rows; row
    ``x = i a + j`` of it is the outer product ``WL[i] ⊗ WM[j]`` flattened, and rows past |V| are never used.
    ``WR`` (r² x d) starts at zero (our choice, so the adapted model starts as the base model); ``WL`` and ``WM``
    start from N(0, 1/r) so a row of ``WL ⊗ WM`` has about unit norm.
    """

    def __init__(self, vocab_size: int, rank: int, out_dim: int):
        super().__init__()
        self.side = math.ceil(math.sqrt(vocab_size))
        self.vocab_size = vocab_size
        self.left = nn.Parameter(torch.randn(self.side, rank) / math.sqrt(rank))  # WL
        self.middle = nn.Parameter(torch.randn(self.side, rank) / math.sqrt(rank))  # WM
        self.right = nn.Parameter(torch.zeros(rank * rank, out_dim))  # WR

    def rows(self, token_ids: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        left = self.left[token_ids // self.side]  # [..., r]
        middle = self.middle[token_ids % self.side]  # [..., r]
        kronecker_rows = (left.unsqueeze(-1) * middle.unsqueeze(-2)).flatten(-2)  # [..., r*r]
        return kronecker_rows @ self.right

    def table(self, embedding_weight: torch.Tensor) -> torch.Tensor:
        return self.rows(torch.arange(self.vocab_size, device=self.left.device), embedding_weight)


class AoTRawTable(nn.Module):
    """No reparametrization: ``P`` is trained directly, from zero. Also the form of loaded collapsed tables."""

    def __init__(self, vocab_size: int, out_dim: int):
        super().__init__()
        self.table_weight = nn.Parameter(torch.zeros(vocab_size, out_dim))

    def rows(self, token_ids: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.table_weight)

    def table(self, embedding_weight: torch.Tensor) -> torch.Tensor:
        return self.table_weight


def build_table(config, embedding_weight: torch.Tensor, hidden_size: int) -> nn.Module:
    """The reparametrization module that `config.reparametrization` names."""
    vocab_size = embedding_weight.shape[0]
    if config.reparametrization == "fc":
        return AoTFCTable(embedding_weight, config.fc_hidden_size, hidden_size)
    if config.reparametrization == "kronecker":
        return AoTKroneckerTable(vocab_size, config.kronecker_rank, hidden_size)
    return AoTRawTable(vocab_size, hidden_size)


def _weights_state(reparam: nn.Module, embedding_weight: torch.Tensor) -> tuple:
    """Storage and in-place version counter of each weight a table is computed from (the reparametrization's and
    ``E``): changes whenever one is updated or replaced."""
    return tuple((w.data_ptr(), w._version) for w in (*reparam.parameters(), embedding_weight))


class AoTPTuningLayer(nn.Module, BaseTunerLayer):
    """A Transformer layer with AoT P-Tuning biases added to its input hidden states.

    Args:
        base_layer: the wrapped Transformer layer; its first argument (or `hidden_states=`) is ``H`` ``[B, T, d]``.
        token_ids: the model's shared `AoTTokenIds`.
    """

    adapter_layer_names = ("aot_reparam",)
    other_param_names = ("aot_collapsed",)

    def __init__(self, base_layer: nn.Module, token_ids: AoTTokenIds):
        super().__init__()
        self.base_layer = base_layer
        self.aot_reparam = nn.ModuleDict()
        self.aot_collapsed = BufferDict(persistent=False)  # adapter -> P_l [V, d], filled by `collapse`
        self._collapsed_from: dict[str, tuple] = {}  # adapter -> the reparametrization weights' states at `collapse`
        self._stack: tuple[torch.Tensor, dict[str, int]] | None = None  # collapsed tables stacked, first row of each
        self.token_ids = token_ids
        self._disable_adapters = False
        self.merged_adapters = []

    def update_layer(self, adapter_name: str, config, hidden_size: int) -> None:
        """Add the reparametrization of adapter `adapter_name`, on the device of the base layer's weights."""
        table = build_table(config, self.token_ids.embedding.weight, hidden_size)
        if not any(p.is_meta for p in table.parameters()):  # meta (low_cpu_mem_usage): the loaded weights land later
            table = table.to(next(self.base_layer.parameters()).device)
        self.aot_reparam[adapter_name] = table
        self.set_adapter(self.active_adapters)

    def train(self, mode: bool = True):
        # Tables collapsed before training would go stale as soon as the reparametrization moves.
        if mode:
            self.aot_collapsed.clear()
            self._stack = None
        return super().train(mode)

    @torch.no_grad()
    def collapse(self, adapter_name: str) -> None:
        """Compute the table ``P_l`` of `adapter_name` once, in the dtype of the base layer, for inference."""
        reparam = self.aot_reparam[adapter_name]
        if isinstance(reparam, AoTRawTable):
            return  # already a table: looking it up costs the same gather
        dtype = next(self.base_layer.parameters()).dtype
        self.aot_collapsed[adapter_name] = reparam.table(self.token_ids.embedding.weight).to(dtype)
        self._collapsed_from[adapter_name] = _weights_state(reparam, self.token_ids.embedding.weight)

    def _collapsed_table(self, adapter_name: str) -> torch.Tensor | None:
        """The collapsed table of `adapter_name`, or None where the reparametrization must run instead.

        It must run while autograd wants the reparametrization's gradients (training in eval mode, e.g. to turn
        dropout off: the table was computed without a graph), and a table is dropped once a weight it came from
        changed in place (an optimizer step, `load_state_dict`, `resize_token_embeddings`), so a stale table is
        never used.
        """
        if adapter_name not in self.aot_collapsed:
            return None
        reparam = self.aot_reparam[adapter_name]
        if torch.is_grad_enabled() and any(p.requires_grad for p in reparam.parameters()):
            return None
        if _weights_state(reparam, self.token_ids.embedding.weight) != self._collapsed_from.get(adapter_name):
            del self.aot_collapsed[adapter_name]
            return None
        return self.aot_collapsed[adapter_name]

    def bias(self, adapter_name: str, token_ids: torch.Tensor) -> torch.Tensor:
        """``P_l[x]`` ``[..., d]`` of `adapter_name` for token ids ``x``."""
        table = self._collapsed_table(adapter_name)
        if table is not None:
            return F.embedding(token_ids, table)  # one gather
        return self.aot_reparam[adapter_name].rows(token_ids, self.token_ids.embedding.weight)

    def _stacked_tables(self, adapter_names: set[str]) -> tuple[torch.Tensor, dict[str, int]] | None:
        """Every collapsed table of this layer in one ``[sum V, d]`` tensor and the first row of each, or None when
        `adapter_names` is empty or one of them has no usable collapsed table (or the tables' dtypes differ).

        Built on first use; each adapter's table then becomes a view into it, so the stack costs no memory, and it
        is rebuilt when a table is no longer the view it made (collapsed again, or dropped as stale).
        """
        if not adapter_names or not all(self._collapsed_table(name) is not None for name in adapter_names):
            return None
        if self._stack is not None:
            stack, starts = self._stack
            if set(starts) == set(self.aot_collapsed) and all(
                self.aot_collapsed[name].data_ptr() == stack[start].data_ptr() for name, start in starts.items()
            ):
                return self._stack
        names = sorted(self.aot_collapsed)
        tables = [self.aot_collapsed[name] for name in names]
        if len({table.dtype for table in tables}) > 1:
            return None
        stack = torch.cat(tables)
        starts = dict(zip(names, itertools.accumulate([0] + [len(table) for table in tables[:-1]])))
        for name, table in zip(names, tables):
            self.aot_collapsed[name] = stack[starts[name] : starts[name] + len(table)]
        self._stack = (stack, starts)
        return self._stack

    def _mixed_batch_bias(self, hidden_states: torch.Tensor, token_ids: torch.Tensor, adapter_names) -> torch.Tensor:
        """Bias ``[B, T, d]`` where example b uses adapter ``adapter_names[b]`` (``"__base__"``: none).

        With the adapters' tables collapsed (inference), this is one gather from their stack (`_stacked_tables`),
        the ids of each example shifted to its adapter's rows, so a mixed batch costs what a one-adapter batch
        costs. Otherwise each run of consecutive examples with the same adapter is gathered into its slice.
        """
        if len(adapter_names) != hidden_states.shape[0]:
            raise ValueError(
                f"`adapter_names` must name one adapter per example: got {len(adapter_names)} names for a batch "
                f"of {hidden_states.shape[0]}."
            )
        used = {name for name in adapter_names if name in self.aot_reparam}
        if (stacked := self._stacked_tables(used)) is not None:
            stack, starts = stacked
            first_rows = torch.tensor([starts.get(name, 0) for name in adapter_names], device=token_ids.device)
            bias = F.embedding(token_ids + first_rows[:, None], stack)
            without = [b for b, name in enumerate(adapter_names) if name not in used]  # "__base__" and the like
            if without:
                bias[without] = 0
            return bias
        bias = torch.empty_like(hidden_states)
        start = 0
        for adapter_name, run in itertools.groupby(adapter_names):
            rows = slice(start, start + len(list(run)))
            start = rows.stop
            if adapter_name not in self.aot_reparam:
                bias[rows] = 0  # "__base__", or an adapter that does not target this layer
            elif (
                (table := self._collapsed_table(adapter_name)) is not None
                and table.dtype == bias.dtype
                and not bias.requires_grad  # an earlier run wrote a graph into `bias`; out= cannot extend it
            ):
                torch.index_select(table, 0, token_ids[rows].reshape(-1), out=bias[rows].view(-1, bias.shape[-1]))
            else:
                bias[rows] = self.bias(adapter_name, token_ids[rows]).to(bias.dtype)
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


__all__ = ["AoTFCTable", "AoTKroneckerTable", "AoTPTuningLayer", "AoTRawTable", "AoTTokenIds", "build_table"]
