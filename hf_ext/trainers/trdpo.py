"""TR-DPO: a TRL `DPOTrainer` whose reference policy is updated during training.

Paper: "Learn Your Reference Model for Real Good Alignment" (Gorbatovski et al., arXiv:2404.09656). The
preference loss (DPO, or IPO with ``loss_type="ipo"``) is TRL's; only the reference moves:

- soft update (TR-DPO α), after every optimizer step:  θ_ref ← α·θ + (1 − α)·θ_ref
- hard update (TR-DPO τ), every τ optimizer steps:      θ_ref ← θ

What this adds to TRL's ``sync_ref_model`` (which has one rule mixing both):

1. PEFT: with a LoRA policy the reference is a second adapter. The soft update mixes the weight deltas
   ΔW = B·A·s, not the factors: ΔW_ref ← α·ΔW + (1 − α)·ΔW_ref, kept at rank ``ref_adapter_rank`` by the best
   (Eckart–Young) truncation of the exact mix, computed from the factors without forming ΔW (see
   :func:`mix_low_rank`); with parameter-targeted LoRA (``LoraConfig(target_parameters=...)``, e.g. MoE expert
   weights) each expert's delta is mixed on its own. The discarded share is logged.
2. Checkpoints: the reference is saved into each checkpoint (``on_save``) and restored by
   ``resume_from_checkpoint``.
3. Distributed: under DDP every rank applies the same update to identical replicas. Under FSDP2 both models are
   sharded alike and each rank updates its own shards, with no gather. Under DeepSpeed ZeRO-3 each parameter
   pair is gathered, updated on rank 0 and re-partitioned, one pair at a time.
4. Numerics: parameters are paired by name (any mismatch is a ValueError) and mixed in fp32; when the
   reference is stored in bf16/fp16, an fp32 master copy keeps small α steps from being rounded away.
5. ``precompute_ref_log_probs=True`` is refused: precomputed log-probs belong to one fixed reference.
6. ``ref/distance`` (‖θ − θ_ref‖₂ just before the update) is logged at every update on a logging step; updates
   between logging steps skip that measurement and cost one fused pass.
"""

import contextlib
import copy
import os
from dataclasses import dataclass, field

import torch
from accelerate.utils import is_peft_model
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import get_config_model_id

from hf_ext._compat.trl import reference_adapter_name

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch build without torch.distributed
    DTensor = distribute_tensor = None

REFERENCE_FILE = "trdpo_reference.safetensors"
_GROUP_NUMEL = 2**25  # bounds the temporary θ − θ_ref of one update group to 128 MB of fp32


@dataclass
class TRDPOConfig(DPOConfig):
    r"""Configuration for [`TRDPOTrainer`]: a [`~trl.DPOConfig`] plus the reference update of TR-DPO.

    Parameters:
        > Parameters that control the reference update

        ref_update (`str`, *optional*, defaults to `"soft"`):
            How the reference follows the policy ([TR-DPO](https://huggingface.co/papers/2404.09656)).
            `"soft"`: after every optimizer step, `θ_ref ← α·θ + (1 − α)·θ_ref`. `"hard"`: every `tau`
            optimizer steps, `θ_ref ← θ`.
        alpha (`float`, *optional*, defaults to `0.6`):
            α of the soft update, in (0, 1]; the paper's best values are 0.5 to 0.6. Used when
            `ref_update="soft"`. Applied every step, the reference is an exponential moving average of the
            policy that trails it by (1 − α)/α optimizer steps on average (0.67 at α = 0.6); for short
            runs a smaller α keeps a longer-lived trust region.
        tau (`int`, *optional*, defaults to `512`):
            τ of the hard update: optimizer steps between two copies, >= 1 (the paper uses 512). Used when
            `ref_update="hard"`.
        ref_adapter_rank (`int`, *optional*):
            PEFT (LoRA) policies only: the rank of the reference adapter (per expert with `target_parameters`).
            The exact soft mix of two deltas has up to twice the rank of its parts; it is truncated to this
            rank by SVD (the discarded share is logged as `ref/truncation_error`). If `None`, twice the
            policy's LoRA rank for `"soft"` and the policy's rank for `"hard"` (where the copy is exact).

        > Parameters whose default differs from [`~trl.DPOConfig`]

        activation_checkpointing (`bool`, *optional*, defaults to `True`):
            Recompute activations in the backward pass to save memory. On by default, as in `DPOConfig`, which
            turns it on through the deprecated `gradient_checkpointing` name; setting either name explicitly
            wins over this default.

    `precompute_ref_log_probs=True` and `sync_ref_model=True` are rejected: the first fixes the
    reference log-probs once, the second is TRL's own (different) reference update.
    """

    # Parameters whose default differs from DPOConfig
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Recompute activations in the backward pass to save memory. On unless this or the deprecated "
            "`gradient_checkpointing` is set.",
            "nargs": "?",
            "const": True,
        },
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Deprecated alias of `activation_checkpointing`.", "nargs": "?", "const": True},
    )

    # Parameters that control the reference update
    ref_update: str = field(
        default="soft",
        metadata={
            "help": "TR-DPO reference update: 'soft' (ref <- alpha*policy + (1-alpha)*ref every optimizer step) or "
            "'hard' (ref <- policy every `tau` optimizer steps).",
            "choices": ["soft", "hard"],
        },
    )
    alpha: float = field(
        default=0.6,
        metadata={"help": "α of the TR-DPO soft update, in (0, 1]. Used with `ref_update='soft'`."},
    )
    tau: int = field(
        default=512,
        metadata={
            "help": "τ of the TR-DPO hard update: optimizer steps between copies, >= 1. Used with `ref_update='hard'`."
        },
    )
    ref_adapter_rank: int | None = field(
        default=None,
        metadata={
            "help": "LoRA policies only: rank of the reference adapter (SVD-truncated mix). Defaults to twice the "
            "policy's rank for 'soft' and the policy's rank for 'hard'."
        },
    )

    def __post_init__(self):
        if self.ref_update not in ("soft", "hard"):
            raise ValueError(f"`ref_update` must be 'soft' or 'hard', got {self.ref_update!r}.")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"`alpha` must be a number in (0, 1], got {self.alpha!r}.")
        if isinstance(self.tau, bool) or not isinstance(self.tau, int) or self.tau < 1:
            raise ValueError(f"`tau` must be an integer >= 1, got {self.tau!r}.")
        if self.ref_adapter_rank is not None and (
            isinstance(self.ref_adapter_rank, bool)
            or not isinstance(self.ref_adapter_rank, int)
            or self.ref_adapter_rank < 1
        ):
            raise ValueError(f"`ref_adapter_rank` must be None or an integer >= 1, got {self.ref_adapter_rank!r}.")
        if self.sync_ref_model:
            raise ValueError(
                "`sync_ref_model=True` turns on TRL's own reference update, which would run beside TR-DPO's. Set "
                "`sync_ref_model=False` and choose the update with `ref_update`, `alpha` and `tau`."
            )
        if self.precompute_ref_log_probs:
            raise ValueError(
                "`precompute_ref_log_probs=True` computes the reference log-probs once, before training, but TR-DPO "
                "changes the reference during training, so they would be stale after the first update. Set "
                "`precompute_ref_log_probs=False`."
            )
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True  # DPOConfig's default, under the current name
        super().__post_init__()


# ----------------------------------------------------------------------------------------------------------------------
# Pure update maths
# ----------------------------------------------------------------------------------------------------------------------


def mix_low_rank(
    factors: list[tuple[torch.Tensor, torch.Tensor, float]], rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factorization of ``M = Σ_i c_i · B_i @ A_i``, without forming M.

    Stacking gives M = B @ A with B = [c_1 B_1, c_2 B_2, ...] (out, K) and A = [A_1; A_2; ...] (K, in).
    With thin QRs B = Q_b R_b and Aᵀ = Q_a R_a, M = Q_b (R_b R_aᵀ) Q_aᵀ, so the SVD of the small
    K × K core gives the SVD of M. Keeping the top ``rank`` singular triplets is the best
    approximation in Frobenius norm (Eckart–Young); it is exact when rank(M) <= ``rank``. Leading
    dimensions are a batch (one matrix per MoE expert), each factorized on its own.

    Args:
        factors: ``(B_i, A_i, c_i)`` with ``B_i`` of shape (..., out, r_i) and ``A_i`` of shape (..., r_i, in).
        rank: rank of the result (>= 1); it is zero-padded when M has fewer singular values.

    Returns:
        ``(B, A, relative_error)``: fp32 ``B`` (..., out, rank) and ``A`` (..., rank, in) with B @ A the
        truncated M, and the largest ‖M − B A‖_F / ‖M‖_F over the batch (0 where M = 0).
    """
    stacked_b = torch.cat([c * b.float() for b, _, c in factors], dim=-1)  # (..., out, K)
    stacked_a = torch.cat([a.float() for _, a, _ in factors], dim=-2)  # (..., K, in)
    q_b, r_b = torch.linalg.qr(stacked_b)  # (..., out, k_b), (..., k_b, K)
    q_a, r_a = torch.linalg.qr(stacked_a.mT)  # (..., in, k_a), (..., k_a, K)
    u, s, vh = torch.linalg.svd(r_b @ r_a.mT, full_matrices=False)  # core (..., k_b, k_a)
    keep = min(rank, s.shape[-1])
    sqrt_s = s[..., :keep].sqrt()
    new_b = stacked_b.new_zeros(*stacked_b.shape[:-1], rank)
    new_a = stacked_a.new_zeros(*stacked_a.shape[:-2], rank, stacked_a.shape[-1])
    new_b[..., :keep] = (q_b @ u[..., :keep]) * sqrt_s[..., None, :]  # split √σ between the factors
    new_a[..., :keep, :] = sqrt_s[..., :, None] * (vh[..., :keep, :] @ q_a.mT)
    total = s.square().sum(-1)
    discarded = torch.where(total > 0, s[..., keep:].square().sum(-1) / total, 0.0)
    return new_b, new_a, discarded.max().sqrt().item()


def low_rank_distance_sq(
    first: tuple[torch.Tensor, torch.Tensor, float], second: tuple[torch.Tensor, torch.Tensor, float]
) -> torch.Tensor:
    """‖c₁ B₁ A₁ − c₂ B₂ A₂‖²_F from the factors: with B = [c₁B₁, −c₂B₂], A = [A₁; A₂], it is Σ (BᵀB) ∘ (AAᵀ).

    Leading dimensions are a batch (MoE experts); the result sums over it.
    """
    b = torch.cat([first[2] * first[0].float(), -second[2] * second[0].float()], dim=-1)
    a = torch.cat([first[1].float(), second[1].float()], dim=-2)
    return ((b.mT @ b) * (a @ a.mT)).sum().clamp_min(0.0)


def mix_group_(
    targets: list[torch.Tensor], policies: list[torch.Tensor], alpha: float, measure: bool = True
) -> torch.Tensor | None:
    """θ_ref ← θ_ref + α·(θ − θ_ref) in place for a group of fp32 tensors; returns Σ‖θ − θ_ref‖² from before.

    With ``measure`` the difference is computed once and serves both the logged distance and the
    update. Without it (the steps that log nothing) the update is one fused ``lerp`` pass and None is
    returned: cheaper than TRL's ``(1 − α)·θ_ref + α·θ`` (two passes). The forms agree up to fp32
    rounding. α = 1 (the hard update) copies exactly. ``torch._foreach_*`` are torch.optim's
    multi-tensor ops: one dispatch per group, not per parameter.
    """
    if not measure:
        if alpha == 1.0:
            torch._foreach_copy_(targets, policies)
        else:
            torch._foreach_lerp_(targets, policies, alpha)
        return None
    diffs = torch._foreach_sub(policies, targets)
    distance_sq = torch.stack(torch._foreach_norm(diffs)).square().sum()
    if alpha == 1.0:
        torch._foreach_copy_(targets, policies)
    else:
        torch._foreach_add_(targets, diffs, alpha=alpha)
    return distance_sq


# ----------------------------------------------------------------------------------------------------------------------
# Pairing and distributed helpers
# ----------------------------------------------------------------------------------------------------------------------


def _shape(param: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 keeps the full shape in `ds_shape`


def pair_parameters(
    policy: torch.nn.Module, reference: torch.nn.Module
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Pair the parameters of ``policy`` and ``reference`` by name, in the policy's order.

    Raises:
        ValueError: naming the first parameter that one model has and the other lacks, or whose
            shapes differ.
    """
    policy_params = dict(policy.named_parameters())
    ref_params = dict(reference.named_parameters())
    for name in policy_params:
        if name not in ref_params:
            raise ValueError(f"The reference model has no parameter `{name}`, which the policy has.")
    for name in ref_params:
        if name not in policy_params:
            raise ValueError(f"The reference model has a parameter `{name}` that the policy lacks.")
    for name, param in policy_params.items():
        if _shape(param) != _shape(ref_params[name]):
            raise ValueError(
                f"Parameter `{name}` has shape {_shape(param)} in the policy but {_shape(ref_params[name])} in the "
                "reference model."
            )
    return [(name, param, ref_params[name]) for name, param in policy_params.items()]


def _is_sharded(param: torch.Tensor) -> bool:
    """Whether ``param`` is an FSDP2 (DTensor) parameter, of which this rank holds one shard."""
    return DTensor is not None and isinstance(param, DTensor)


def _check_same_sharding(name: str, param: torch.Tensor, ref: torch.Tensor) -> None:
    """FSDP2 shards both models alike (each parameter on dim 0 over the same mesh), so shards pair up locally."""
    if not (_is_sharded(param) or _is_sharded(ref)):
        return
    if not (
        _is_sharded(param)
        and _is_sharded(ref)
        and param.device_mesh == ref.device_mesh
        and param.placements == ref.placements
        and param.to_local().shape == ref.to_local().shape
    ):
        describe = [
            f"{tuple(p.placements)} on {p.device_mesh}" if _is_sharded(p) else "not sharded" for p in (param, ref)
        ]
        raise ValueError(
            f"Parameter `{name}` is sharded differently in the policy ({describe[0]}) and the reference "
            f"({describe[1]}). TR-DPO updates each rank's shards in place, so both models must be sharded alike."
        )


def _local(param: torch.Tensor) -> torch.Tensor:
    """The tensor this rank updates: its shard of an FSDP2 parameter, else the (gathered) parameter's data."""
    return param.to_local() if _is_sharded(param) else param.data


def _full(param: torch.Tensor) -> torch.Tensor:
    """The whole value of a parameter: an FSDP2 parameter is all-gathered (one at a time: bounded memory)."""
    return param.full_tensor() if _is_sharded(param) else param.data


def _full_of_local(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor whose shards, laid out as ``like``'s, are each rank's ``local``."""
    if not _is_sharded(like):
        return local
    return DTensor.from_local(
        local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride()
    ).full_tensor()


def _local_of_full(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``value`` (a whole tensor every rank holds), laid out as ``like``'s."""
    if not _is_sharded(like):
        return value
    return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None).to_local()


def _gathered(params: list[torch.Tensor], zero3: bool):
    """Under ZeRO-3, gather ``params`` whole for the block; rank 0's changes are re-partitioned on exit."""
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def _is_writer(zero3: bool) -> bool:
    return not zero3 or torch.distributed.get_rank() == 0


def _whole_state(
    entries: list[tuple[str, torch.Tensor, torch.Tensor]], master: dict[str, torch.Tensor], zero3: bool, keep: bool
) -> dict[str, torch.Tensor]:
    """The whole value of each reference tensor ``(name, _, ref)`` (its fp32 master where kept), on the CPU.

    Every rank joins the gathers (one tensor at a time); only where ``keep`` (and on rank 0 under ZeRO-3) are the
    values returned.
    """
    state = {}
    for name, _, ref in entries:
        with _gathered([ref], zero3):
            if _is_writer(zero3):
                value = _full_of_local(master.get(name, _local(ref)), ref)
                if keep:
                    state[name] = value.detach().cpu().clone()
    return state


class _SumOfSquares:
    """Accumulates squared norms on each tensor's own device; one host sync at the end, not one per parameter.

    ``shard=True`` marks a value computed on this rank's FSDP2 shards only: those are summed over the ranks.
    """

    def __init__(self):
        self.whole: dict[torch.device, torch.Tensor] = {}
        self.shards: torch.Tensor | None = None

    def add(self, value: torch.Tensor | None, shard: bool = False) -> None:
        if value is None:  # an update that measured nothing
            return
        if shard:
            self.shards = value if self.shards is None else self.shards + value.to(self.shards.device)
        else:
            self.whole[value.device] = self.whole.get(value.device, 0.0) + value

    def sqrt(self, sharded: bool = False) -> float:
        """The square root of the total; with ``sharded`` (every rank must call it) an all-reduce."""
        total = sum(float(v) for v in self.whole.values())
        if sharded:  # every rank holds shards, so `shards` is set on all of them
            shards = self.shards.double()
            torch.distributed.all_reduce(shards)
            total += float(shards)
        return total**0.5


def _from_writer(values: dict[str, float], zero3: bool, device: torch.device) -> dict[str, float]:
    """Under ZeRO-3 only rank 0 measures: it sends its values to the other ranks, so that all log the same."""
    if not zero3:
        return values
    sent = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    torch.distributed.broadcast(sent, src=0)
    return dict(zip(values, sent.tolist(), strict=True))


# ----------------------------------------------------------------------------------------------------------------------
# The two kinds of reference: a full model, or a LoRA adapter beside the policy's
# ----------------------------------------------------------------------------------------------------------------------


class _FullReference:
    """A separate reference model, updated parameter by parameter.

    Parameters stored in fp32 are mixed in place. Others (bf16/fp16) get an fp32 master copy, which is
    mixed and then rounded into the parameter: 4 bytes per such parameter, i.e. twice the memory of a
    bf16 reference (kept on the CPU of rank 0 under ZeRO-3; one shard per rank under FSDP2).

    Args:
        policy: the policy (unwrapped).
        reference: the reference model (unwrapped), paired with the policy by parameter name.
        zero3: whether both models are partitioned by DeepSpeed ZeRO-3.
    """

    def __init__(self, policy: torch.nn.Module, reference: torch.nn.Module, zero3: bool = False):
        self.policy, self.reference, self.zero3 = policy, reference, zero3
        self.master: dict[str, torch.Tensor] = {}
        self.bind()  # fails on a mismatch now

    def bind(self) -> None:
        """Pair the parameters again: accelerate's FSDP2 replaces the policy's parameters when it shards them."""
        self.pairs = pair_parameters(self.policy, self.reference)
        for name, param, ref in self.pairs:
            _check_same_sharding(name, param, ref)
        self.sharded = any(_is_sharded(ref) for _, _, ref in self.pairs)

    def _master(self, name: str, ref: torch.Tensor) -> torch.Tensor | None:
        """The fp32 master of a bf16/fp16 reference tensor (made on first use); None for an fp32 one."""
        if ref.dtype == torch.float32:
            return None
        if name not in self.master:
            device = "cpu" if self.zero3 else ref.device
            self.master[name] = ref.detach().to(device=device, dtype=torch.float32, copy=True)
        return self.master[name]

    def _groups(self):
        """Consecutive pairs on one device, at most `_GROUP_NUMEL` elements each; single pairs under ZeRO-3."""
        group, numel = [], 0
        for pair in self.pairs:
            if group and (
                self.zero3 or numel + pair[1].numel() > _GROUP_NUMEL or pair[1].device != group[0][1].device
            ):
                yield group
                group, numel = [], 0
            group.append(pair)
            numel += pair[1].numel()
        if group:
            yield group

    @torch.no_grad()
    def update(self, alpha: float, measure: bool = True) -> dict[str, float]:
        """Move the reference towards the policy by ``alpha``; with ``measure``, return ``ref/distance`` from before."""
        distance_sq = _SumOfSquares()
        for group in self._groups():
            with _gathered([t for _, param, ref in group for t in (param, ref)], self.zero3):
                if not _is_writer(self.zero3):
                    continue
                refs = [_local(ref) for _, _, ref in group]
                masters = [self._master(name, ref) for (name, _, _), ref in zip(group, refs, strict=True)]
                targets = [ref if m is None else m for ref, m in zip(refs, masters, strict=True)]
                policies = [
                    _local(param).to(device=t.device, dtype=torch.float32)
                    for (_, param, _), t in zip(group, targets, strict=True)
                ]
                distance_sq.add(mix_group_(targets, policies, alpha, measure), shard=self.sharded)
                for ref, master in zip(refs, masters, strict=True):
                    if master is not None:
                        ref.copy_(master)  # round the fp32 result into the stored dtype
        if not measure:
            return {}
        return _from_writer({"ref/distance": distance_sq.sqrt(self.sharded)}, self.zero3, self.pairs[0][2].device)

    @torch.no_grad()
    def state_dict(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """The whole reference (fp32 masters where kept), on the CPU; every rank joins, those without ``keep`` get {}."""
        return _whole_state(self.pairs, self.master, self.zero3, keep)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, _, ref in self.pairs:
            if name not in state:
                raise ValueError(f"The saved reference has no parameter `{name}`.")
            with _gathered([ref], self.zero3):
                if not _is_writer(self.zero3):
                    continue
                local = _local(ref)
                value = _local_of_full(state[name].to(local.device), ref)
                if ref.dtype != torch.float32:
                    self.master[name] = value.to(device="cpu" if self.zero3 else local.device, dtype=torch.float32)
                local.copy_(value)


def _lora_params(layer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The parameters (B, A) of ``adapter`` in a LoRA layer."""
    if adapter in layer.lora_A:
        return layer.lora_B[adapter].weight, layer.lora_A[adapter].weight
    return layer.lora_embedding_B[adapter], layer.lora_embedding_A[adapter]


def _num_experts(layer) -> int:
    """The experts of a parameter-targeted LoRA layer (PEFT's `ParamWrapper` of a 3-d MoE weight), else 1."""
    from peft.tuners.lora import ParamWrapper

    return layer.num_experts if isinstance(layer, ParamWrapper) else 1


def _factors(b: torch.Tensor, a: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The matrices whose product ΔW is linear in: (out, r) @ (r, in), or per expert (E, out, r) @ (E, r, in).

    PEFT's `ParamWrapper` stacks the experts' factors in one pair of linears: rows ``e·r:(e+1)·r`` of A are
    expert e's, and columns ``i·E + e`` of B (``B.reshape(out, r, E)[..., e]``) are; see its ``get_delta_weight``.
    """
    if experts == 1:
        return b.flatten(1), a.flatten(1)
    return b.reshape(b.shape[0], -1, experts).permute(2, 0, 1), a.reshape(experts, -1, a.shape[-1])


def _unfactor(b: torch.Tensor, a: torch.Tensor, experts: int, like_b: torch.Tensor, like_a: torch.Tensor):
    """The inverse of :func:`_factors`: ``(b, a)`` laid out as the LoRA parameters ``like_b``, ``like_a``."""
    if experts == 1:
        return b.reshape(like_b.shape), a.reshape(like_a.shape)
    return b.permute(1, 2, 0).reshape(like_b.shape), a.reshape(like_a.shape)


class _LoraReference:
    """The reference as a LoRA adapter next to the policy's adapter in the same PeftModel.

    The adapter is named as TRL's loss expects (:func:`hf_ext._compat.trl.reference_adapter_name`). Its scaling
    is 1, so ΔW_ref = B_ref A_ref (up to the layer's fixed reshaping/transposition). The update mixes ΔW (see
    :func:`mix_low_rank`), per expert for parameter-targeted LoRA. Non-LoRA trainable adapter parameters
    (``modules_to_save``) are mixed elementwise, like a full model. The reference factors are kept in fp32 in
    ``master`` (the policy adapter is fp32 unless PEFT was told otherwise).

    Args:
        model: the policy `PeftModel` (unwrapped).
        rank: the reference adapter's rank, or None for the default of `TRDPOConfig.ref_adapter_rank`.
        ref_update: ``"soft"`` or ``"hard"``.
        zero3: whether the model is partitioned by DeepSpeed ZeRO-3.

    Raises:
        NotImplementedError: for a PEFT method other than LoRA.
        ValueError: for a LoRA whose delta is not linear in B·A (DoRA and other LoRA variants, `lora_bias`,
            convolutions with `groups > 1`): its mix cannot be computed exactly from the factors.
    """

    def __init__(self, model, rank: int | None, ref_update: str, zero3: bool = False):
        from peft import LoraConfig
        from peft.tuners.lora import LoraLayer

        self.model, self.zero3 = model, zero3
        self.adapter, self.ref_adapter = model.active_adapter, reference_adapter_name()
        config = model.peft_config[self.adapter]
        if not isinstance(config, LoraConfig):
            raise NotImplementedError(
                f"TRDPOTrainer supports LoRA PEFT policies; got a {type(config).__name__}. Merge the adapter into the "
                "model and train it in full, or use LoRA."
            )
        for option in ("use_dora", "lora_bias"):
            if getattr(config, option, False):
                raise ValueError(f"TRDPOTrainer does not support LoRA with `{option}=True`: its delta is not B·A·s.")
        self.layers = [  # (name, layer, experts)
            (name, m, _num_experts(m))
            for name, m in model.named_modules()
            if isinstance(m, LoraLayer) and self.adapter in m.scaling
        ]
        for name, layer, _ in self.layers:
            if self.adapter in layer.lora_variant:
                raise ValueError(
                    f"LoRA layer `{name}` uses the variant {type(layer.lora_variant[self.adapter]).__name__}, whose "
                    "delta is not B·A·s, so TR-DPO cannot average the reference update exactly."
                )
            groups = getattr(layer.get_base_layer(), "groups", 1)  # convolutions have groups
            if groups > 1:
                raise ValueError(
                    f"LoRA layer `{name}` adapts a convolution with groups={groups}, whose "
                    "delta is not B·A·s, so TR-DPO cannot average the reference update exactly."
                )
        policy_rank = max([config.r, *config.rank_pattern.values()])
        self.rank = rank or (2 * policy_rank if ref_update == "soft" else policy_rank)
        if self.ref_adapter in model.peft_config:  # TRL adds a copy of a pre-trained adapter; ours has its own rank
            model.delete_adapter(self.ref_adapter)
        ref_config = copy.deepcopy(config)
        ref_config.r, ref_config.lora_alpha, ref_config.use_rslora = self.rank, self.rank, False  # scaling 1
        ref_config.rank_pattern, ref_config.alpha_pattern, ref_config.inference_mode = {}, {}, True
        # The factors are overwritten by the first update below. A data- or weight-driven init of the policy's config
        # (PiSSA, OLoRA, CorDA, LoftQ, ...) would rewrite the base weights the policy shares with this adapter.
        ref_config.init_lora_weights = True
        # TRL disables dropout before this adapter exists; without this the reference forward (run in train mode)
        # would apply the policy's LoRA dropout and give noisy reference log-probs.
        ref_config.lora_dropout = 0.0
        model.add_adapter(self.ref_adapter, ref_config)
        model.set_adapter(self.adapter)
        for name, param in model.named_parameters():
            if f".{self.ref_adapter}." in name:
                param.requires_grad_(False)
        self.master: dict[str, torch.Tensor] = {}
        self.bind()
        self.update(1.0, measure=False)  # start from the policy: ΔW_ref = ΔW

    def bind(self) -> None:
        """Pair the elementwise adapter parameters again (accelerate's FSDP2 replaces parameters when sharding)."""
        lora_names = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"}
        params = dict(self.model.named_parameters())
        self.extras = []  # (name, policy param, reference param): elementwise adapter parameters
        for name, param in params.items():
            parts = name.split(".")
            if self.adapter not in parts or lora_names & set(parts):
                continue
            ref_name = ".".join(self.ref_adapter if p == self.adapter else p for p in parts)
            if ref_name not in params or _shape(params[ref_name]) != _shape(param):
                raise ValueError(f"Adapter parameter `{name}` has no matching reference parameter `{ref_name}`.")
            ref = params[ref_name]
            _check_same_sharding(name, param, ref)
            if name in self.master and self.master[name].shape != _local(ref).shape:  # made whole, before FSDP2
                self.master[name] = _local_of_full(self.master[name].to(_local(ref).device), ref)
            self.extras.append((name, param, ref))
        self.sharded = any(_is_sharded(ref) for _, _, ref in self.extras)

    @torch.no_grad()
    def update(self, alpha: float, measure: bool = True) -> dict[str, float]:
        """Mix the reference adapter towards the policy's; with ``measure``, also return the logged values."""
        distance_sq, worst_error = _SumOfSquares(), 0.0
        for name, layer, experts in self.layers:
            policy_b, policy_a = _lora_params(layer, self.adapter)
            ref_b, ref_a = _lora_params(layer, self.ref_adapter)
            with _gathered([policy_b, policy_a, ref_b, ref_a], self.zero3):
                if not _is_writer(self.zero3):
                    continue
                policy = (*_factors(_full(policy_b), _full(policy_a), experts), float(layer.scaling[self.adapter]))
                parts = [(policy[0], policy[1], alpha * policy[2])]
                if measure or alpha < 1.0:  # the first update (alpha = 1, in __init__) has no reference yet
                    ref = (self.master[f"{name}.lora_B"], self.master[f"{name}.lora_A"], 1.0)
                    if measure:
                        distance_sq.add(low_rank_distance_sq(policy, ref))
                    if alpha < 1.0:
                        parts.append((ref[0], ref[1], 1.0 - alpha))
                new_b, new_a, error = mix_low_rank(parts, self.rank)
                worst_error = max(worst_error, error)
                self._store(name, layer, experts, new_b, new_a)
        for name, param, ref in self.extras:
            with _gathered([param, ref], self.zero3):
                if not _is_writer(self.zero3):
                    continue
                local = _local(ref)
                if name not in self.master:
                    self.master[name] = local.float().clone()
                target = self.master[name]
                policy = _local(param).to(device=target.device, dtype=torch.float32)
                distance_sq.add(mix_group_([target], [policy], alpha, measure), shard=self.sharded)
                local.copy_(target)
        if not measure:
            return {}
        values = {"ref/distance": distance_sq.sqrt(self.sharded), "ref/truncation_error": worst_error}
        return _from_writer(values, self.zero3, _lora_params(self.layers[0][1], self.adapter)[0].device)

    def _store(self, name: str, layer, experts: int, new_b: torch.Tensor, new_a: torch.Tensor) -> None:
        """Keep the fp32 factors of layer ``name`` and write them into its reference adapter."""
        self.master[f"{name}.lora_B"], self.master[f"{name}.lora_A"] = new_b, new_a
        ref_b, ref_a = _lora_params(layer, self.ref_adapter)
        b, a = _unfactor(new_b, new_a, experts, ref_b, ref_a)
        for param, value in ((ref_b, b), (ref_a, a)):
            _local(param).copy_(_local_of_full(value.to(_local(param).device), param))

    @torch.no_grad()
    def state_dict(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """The reference factors and elementwise parameters (fp32, CPU); every rank joins, only ``keep`` gets them."""
        state = _whole_state(self.extras, self.master, self.zero3, keep)
        if keep:  # the factors: whole on every rank (rank 0 under ZeRO-3)
            state.update({key: value.detach().cpu().clone() for key, value in self.master.items() if key not in state})
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, layer, experts in self.layers:
            for key in (f"{name}.lora_B", f"{name}.lora_A"):
                if key not in state:
                    raise ValueError(f"The saved reference adapter has no tensor `{key}`.")
            with _gathered(list(_lora_params(layer, self.ref_adapter)), self.zero3):
                if _is_writer(self.zero3):
                    device = _local(_lora_params(layer, self.ref_adapter)[0]).device
                    self._store(name, layer, experts, state[f"{name}.lora_B"].to(device), state[f"{name}.lora_A"].to(device))
        for name, _, ref in self.extras:
            if name not in state:
                raise ValueError(f"The saved reference adapter has no tensor `{name}`.")
            with _gathered([ref], self.zero3):
                if _is_writer(self.zero3):
                    local = _local(ref)
                    self.master[name] = _local_of_full(state[name].to(local.device), ref).float()
                    local.copy_(self.master[name])


# ----------------------------------------------------------------------------------------------------------------------
# Callback and trainer
# ----------------------------------------------------------------------------------------------------------------------


class TRDPOReferenceCallback(TrainerCallback):
    """Applies the TR-DPO reference update at the end of optimizer steps, and saves/restores the reference.

    Soft: every step, θ_ref ← α·θ + (1 − α)·θ_ref. Hard: when ``global_step % tau == 0``, θ_ref ← θ.
    An update on a step that logs (``control.should_log``, set by the trainer's flow callback, which
    runs before this one) keeps ``ref/distance`` (and, for LoRA, ``ref/truncation_error``) in ``metrics``
    until [`TRDPOTrainer`] logs them with its own; the other updates skip that measurement, which would
    cost a pass over both models. On each checkpoint save (``on_save``) the reference is written to
    ``trdpo_reference.safetensors`` in the checkpoint folder; a checkpoint set in ``resume_from`` is
    restored when training begins.

    Args:
        reference: the paired policy/reference state (built by [`TRDPOTrainer`]).
        ref_update: ``"soft"`` or ``"hard"``.
        alpha: α of the soft update.
        tau: τ of the hard update.
    """

    def __init__(self, reference, ref_update: str, alpha: float, tau: int):
        self.reference = reference
        self.ref_update = ref_update
        self.alpha = alpha
        self.tau = tau
        self.metrics: dict[str, float] = {}
        self.resume_from: str | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.reference.bind()  # the models are wrapped or sharded by now
        if self.resume_from is not None:
            self.load(self.resume_from)
            self.resume_from = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.ref_update == "soft":
            self.metrics.update(self.reference.update(self.alpha, control.should_log))
        elif state.global_step % self.tau == 0:
            self.metrics.update(self.reference.update(1.0, control.should_log))

    def on_save(self, args, state, control, **kwargs):
        self.save(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"), args.should_save)

    def pop_metrics(self) -> dict[str, float]:
        """The values measured since the last call (empty when the last updates measured nothing)."""
        metrics, self.metrics = self.metrics, {}
        return metrics

    def save(self, folder: str, write: bool) -> None:
        """Save the reference (fp32 masters where kept) to ``folder/trdpo_reference.safetensors``."""
        state = self.reference.state_dict(keep=write)  # every rank joins the gathers
        if write:
            metadata = {"ref_update": self.ref_update, "alpha": str(self.alpha), "tau": str(self.tau)}
            save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, REFERENCE_FILE), metadata)

    def load(self, folder: str) -> None:
        """Restore the reference saved by :meth:`save` in ``folder``."""
        self.reference.load_state_dict(load_file(_reference_file(folder)))


def _reference_file(folder: str) -> str:
    path = os.path.join(folder, REFERENCE_FILE)
    if not os.path.isfile(path):
        raise ValueError(
            f"Checkpoint {folder!r} has no {REFERENCE_FILE}, so the TR-DPO reference cannot be restored (it was not "
            "saved by TRDPOTrainer). Resuming would silently restart the reference from the initial policy."
        )
    return path


class TRDPOTrainer(DPOTrainer):
    """A [`~trl.DPOTrainer`] whose reference policy follows the policy during training (TR-DPO).

    Paper: [Learn Your Reference Model for Real Good Alignment](https://huggingface.co/papers/2404.09656).
    Same constructor, datasets and loss types as `DPOTrainer` (TR-IPO is `loss_type="ipo"`); the update
    is set by [`TRDPOConfig`] (`ref_update`, `alpha`, `tau`) and applied by [`TRDPOReferenceCallback`].

    - Model: a Hub id or local path (loaded with `args.model_init_kwargs`, as `DPOTrainer` does), a
      `PreTrainedModel` or a `PeftModel`.
    - Full model: the reference is `ref_model`; when it is None, TRL's reference for a model id (the same
      checkpoint, loaded again), or a deep copy of an in-memory policy made before training (TRL would reload
      it from `config._name_or_path`, which fails for models built in code). Its parameters must match the
      policy's by name and shape.
    - PEFT (LoRA, including `target_parameters`): pass `peft_config` or a `PeftModel` and no `ref_model`; the
      reference is a second adapter, started as a copy of the policy's ΔW.
    - Distributed: DDP, FSDP2 (`fsdp_version=2`) and DeepSpeed ZeRO (1-3); FSDP1 is refused.
    - Memory: a bf16/fp16 full reference gets an fp32 master copy (4 bytes per parameter, on the CPU of
      rank 0 under ZeRO-3) so that small α steps are not rounded away; an fp32 reference needs none. A
      LoRA reference keeps fp32 factors of rank `ref_adapter_rank`.
    - Model card: TRL's, naming TR-DPO and its paper, with the tags `trl`, `dpo`, `tr-dpo`, `hf-ext`.

    Args:
        model: the policy, as for `DPOTrainer`.
        ref_model: the reference model (full-model training only), or None.
        args: a [`TRDPOConfig`]; if None, `TRDPOConfig("<model name>-TRDPO")`, as `DPOTrainer` builds its default.
        **kwargs: the other `DPOTrainer` arguments (`train_dataset`, `processing_class`, `peft_config`, ...).

    Examples:

    >>> from hf_ext import TRDPOConfig, TRDPOTrainer
    >>> from hf_ext.data.preference import preference_dataset
    >>> from hf_ext.testing import get_tiny_tokenizer, tiny_gpt2
    >>> args = TRDPOConfig("/tmp/trdpo-doc", ref_update="soft", alpha=0.6, max_steps=2, per_device_train_batch_size=2,
    ...                    bf16=False, use_cpu=True, activation_checkpointing=False, report_to="none", max_length=32,
    ...                    save_strategy="no", disable_tqdm=True)
    >>> trainer = TRDPOTrainer(tiny_gpt2(), args=args, train_dataset=preference_dataset(8),
    ...                        processing_class=get_tiny_tokenizer())
    >>> _ = trainer.train()  # doctest: +ELLIPSIS
    {'train_runtime': ...}
    >>> [log["ref/distance"] > 0 for log in trainer.state.log_history if "ref/distance" in log]
    [True]
    """

    # TRL's model card hooks: the card names the trainer and cites its paper
    _tag_names = ["trl", "dpo", "tr-dpo", "hf-ext"]
    _name = "TR-DPO"
    _paper = {
        "title": "Learn Your Reference Model for Real Good Alignment",
        "id": "2404.09656",
        "citation": (
            "@inproceedings{gorbatovski2025learn,\n    title  = {{Learn Your Reference Model for Real Good Alignment}},\n"
            "    author = {Gorbatovski, Alexey and others},\n    booktitle = {ICLR},\n    year = 2025,\n"
            "    eprint = {arXiv:2404.09656}\n}"
        ),
    }

    def __init__(self, model, ref_model=None, args: TRDPOConfig | None = None, *pos_args, **kwargs):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = TRDPOConfig(f"{model_name.split('/')[-1]}-TRDPO")
        elif not isinstance(args, TRDPOConfig):
            raise TypeError(f"`args` must be a TRDPOConfig, got {type(args).__name__}.")
        uses_peft = kwargs.get("peft_config") is not None or (not isinstance(model, str) and is_peft_model(model))
        if uses_peft and ref_model is not None:
            raise ValueError(
                "With a PEFT policy the TR-DPO reference is an adapter beside the policy's; pass `ref_model=None`."
            )
        if not uses_peft and not isinstance(model, str):
            if ref_model is None:
                ref_model = copy.deepcopy(model)  # TRL would reload it from `config._name_or_path`
            else:
                pair_parameters(model, ref_model)  # fail on a mismatch before any data processing
        super().__init__(model, ref_model, args, *pos_args, **kwargs)
        if self.is_fsdp_enabled and self.accelerator.state.fsdp_plugin.fsdp_version != 2:
            raise NotImplementedError(
                "TRDPOTrainer supports FSDP2 only (`fsdp_config={'version': 2}`): FSDP1 flattens the parameters, so "
                "the policy and the reference cannot be paired by name."
            )

        policy = self.accelerator.unwrap_model(self.model)
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        if is_peft_model(policy):
            reference = _LoraReference(policy, args.ref_adapter_rank, args.ref_update, zero3)
        else:
            reference = _FullReference(policy, self.accelerator.unwrap_model(self.ref_model), zero3)
        self.ref_callback = TRDPOReferenceCallback(reference, args.ref_update, args.alpha, args.tau)
        self.add_callback(self.ref_callback)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`; a checkpoint to resume from must hold the reference, which is restored with the rest."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True  # True: Trainer raises
        if isinstance(resume_from_checkpoint, str):
            _reference_file(resume_from_checkpoint)  # fail before any work
            self.ref_callback.resume_from = resume_from_checkpoint
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs.update(self.ref_callback.pop_metrics())
        super().log(logs, start_time)


__all__ = ["TRDPOConfig", "TRDPOReferenceCallback", "TRDPOTrainer", "mix_group_", "mix_low_rank", "pair_parameters"]
