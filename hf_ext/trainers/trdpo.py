"""TR-DPO: a TRL `DPOTrainer` whose reference policy is updated during training.

Paper: "Learn Your Reference Model for Real Good Alignment" (Gorbatovski et al., arXiv:2404.09656). The
preference loss (DPO, or IPO with ``loss_type="ipo"``) is TRL's; only the reference moves:

- soft update (TR-DPO α), after every optimizer step:  θ_ref ← α·θ + (1 − α)·θ_ref
- hard update (TR-DPO τ), every τ optimizer steps:      θ_ref ← θ

What this adds to TRL's ``sync_ref_model`` (which has one rule mixing both):

1. PEFT: with a LoRA policy the reference is a second adapter ``"ref"``. The soft update mixes the
   weight deltas ΔW = B·A·s, not the factors: ΔW_ref ← α·ΔW + (1 − α)·ΔW_ref, kept at rank
   ``ref_adapter_rank`` by the best (Eckart–Young) truncation of the exact mix, computed from the
   factors without forming ΔW (see :func:`mix_low_rank`). The discarded share is logged.
2. Checkpoints: the reference is saved beside the optimizer state of each checkpoint and restored by
   ``resume_from_checkpoint``.
3. Distributed: under DDP every rank applies the same update to identical replicas. Under DeepSpeed
   ZeRO-3 each parameter pair is gathered, updated on rank 0 and re-partitioned, one pair at a time.
4. Numerics: parameters are paired by name (any mismatch is a ValueError) and mixed in fp32; when the
   reference is stored in bf16/fp16, an fp32 master copy keeps small α steps from being rounded away.
5. ``precompute_ref_log_probs=True`` is refused: precomputed log-probs belong to one fixed reference.
6. ``ref/distance`` (‖θ − θ_ref‖₂ just before the update) is logged with TRL's metrics at every update on a logging
   step; updates between logging steps skip that measurement and cost one fused pass.
"""

import contextlib
import copy
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

REFERENCE_FILE = "trdpo_reference.safetensors"
REF_ADAPTER = "ref"  # the adapter name TRL's DPOTrainer uses for the reference in its loss
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
            PEFT (LoRA) policies only: the rank of the reference adapter. The exact soft mix of two deltas
            has up to twice the rank of its parts; it is truncated to this rank by SVD (the discarded share
            is logged as `ref/truncation_error`). If `None`, twice the policy's LoRA rank for `"soft"` and
            the policy's rank for `"hard"` (where the copy is exact).

    `precompute_ref_log_probs=True` and `sync_ref_model=True` are rejected: the first fixes the
    reference log-probs once, the second is TRL's own (different) reference update.
    """

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
    approximation in Frobenius norm (Eckart–Young); it is exact when rank(M) <= ``rank``.

    Args:
        factors: ``(B_i, A_i, c_i)`` with ``B_i`` of shape (out, r_i) and ``A_i`` of shape (r_i, in).
        rank: rank of the result (>= 1); it is zero-padded when M has fewer singular values.

    Returns:
        ``(B, A, relative_error)``: fp32 ``B`` (out, rank) and ``A`` (rank, in) with B @ A the
        truncated M, and ‖M − B A‖_F / ‖M‖_F (0 when M = 0).
    """
    stacked_b = torch.cat([c * b.float() for b, _, c in factors], dim=1)  # (out, K)
    stacked_a = torch.cat([a.float() for _, a, _ in factors], dim=0)  # (K, in)
    q_b, r_b = torch.linalg.qr(stacked_b)  # (out, k_b), (k_b, K)
    q_a, r_a = torch.linalg.qr(stacked_a.T)  # (in, k_a), (k_a, K)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # core (k_b, k_a)
    keep = min(rank, s.numel())
    sqrt_s = s[:keep].sqrt()
    new_b = stacked_b.new_zeros(stacked_b.shape[0], rank)
    new_a = stacked_a.new_zeros(rank, stacked_a.shape[1])
    new_b[:, :keep] = (q_b @ u[:, :keep]) * sqrt_s  # split √σ between the factors to balance their scales
    new_a[:keep] = sqrt_s[:, None] * (vh[:keep] @ q_a.T)
    total = s.square().sum()
    error = (s[keep:].square().sum() / total).sqrt().item() if total > 0 else 0.0
    return new_b, new_a, error


def low_rank_distance_sq(
    first: tuple[torch.Tensor, torch.Tensor, float], second: tuple[torch.Tensor, torch.Tensor, float]
) -> torch.Tensor:
    """‖c₁ B₁ A₁ − c₂ B₂ A₂‖²_F from the factors: with B = [c₁B₁, −c₂B₂], A = [A₁; A₂], it is Σ (BᵀB) ∘ (AAᵀ)."""
    b = torch.cat([first[2] * first[0].float(), -second[2] * second[0].float()], dim=1)
    a = torch.cat([first[1].float(), second[1].float()], dim=0)
    return ((b.T @ b) * (a @ a.T)).sum().clamp_min(0.0)


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


def _is_zero3() -> bool:
    from accelerate.state import AcceleratorState

    plugin = AcceleratorState().deepspeed_plugin if AcceleratorState._shared_state else None
    return plugin is not None and plugin.zero_stage == 3


def _gathered(params: list[torch.Tensor], zero3: bool):
    """Under ZeRO-3, gather ``params`` whole for the block; rank 0's changes are re-partitioned on exit."""
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


class _SumOfSquares:
    """Accumulates squared norms on each tensor's own device; one host sync at the end, not one per parameter."""

    def __init__(self):
        self.per_device: dict[torch.device, torch.Tensor] = {}

    def add(self, value: torch.Tensor | None) -> None:
        if value is not None:  # None: an update that measured nothing
            self.per_device[value.device] = self.per_device.get(value.device, 0.0) + value

    def sqrt(self) -> float:
        return sum(float(v) for v in self.per_device.values()) ** 0.5


def _is_writer(zero3: bool) -> bool:
    return not zero3 or torch.distributed.get_rank() == 0


# ----------------------------------------------------------------------------------------------------------------------
# The two kinds of reference: a full model, or a LoRA adapter beside the policy's
# ----------------------------------------------------------------------------------------------------------------------


class _FullReference:
    """A separate reference model, updated parameter by parameter.

    Parameters stored in fp32 are mixed in place. Others (bf16/fp16) get an fp32 master copy, which is
    mixed and then rounded into the parameter: 4 bytes per such parameter, i.e. twice the memory of a
    bf16 reference (kept on the CPU of rank 0 under ZeRO-3).
    """

    def __init__(self, policy: torch.nn.Module, reference: torch.nn.Module):
        self.pairs = pair_parameters(policy, reference)
        self.master: dict[str, torch.Tensor] = {}

    def _master(self, name: str, ref: torch.Tensor, zero3: bool) -> torch.Tensor | None:
        """The fp32 master of a bf16/fp16 reference parameter (made on first use); None for an fp32 one."""
        if ref.dtype == torch.float32:
            return None
        if name not in self.master:
            self.master[name] = ref.detach().to(device="cpu" if zero3 else ref.device, dtype=torch.float32, copy=True)
        return self.master[name]

    def _groups(self, zero3: bool):
        """Consecutive pairs on one device, at most `_GROUP_NUMEL` elements each; single pairs under ZeRO-3."""
        group, numel = [], 0
        for pair in self.pairs:
            if group and (zero3 or numel + pair[1].numel() > _GROUP_NUMEL or pair[1].device != group[0][1].device):
                yield group
                group, numel = [], 0
            group.append(pair)
            numel += pair[1].numel()
        if group:
            yield group

    @torch.no_grad()
    def update(self, alpha: float, measure: bool = True) -> dict[str, float]:
        """Move the reference towards the policy by ``alpha``; with ``measure``, return ``ref/distance`` from before."""
        zero3 = _is_zero3()
        distance_sq = _SumOfSquares()
        for group in self._groups(zero3):
            with _gathered([t for _, param, ref in group for t in (param, ref)], zero3):
                if not _is_writer(zero3):
                    continue
                masters = [self._master(name, ref.data, zero3) for name, _, ref in group]
                targets = [ref.data if m is None else m for (_, _, ref), m in zip(group, masters, strict=True)]
                policies = [
                    param.data.to(device=t.device, dtype=torch.float32)
                    for (_, param, _), t in zip(group, targets, strict=True)
                ]
                distance_sq.add(mix_group_(targets, policies, alpha, measure))
                for (_, _, ref), master in zip(group, masters, strict=True):
                    if master is not None:
                        ref.data.copy_(master)  # round the fp32 result into the stored dtype
        return {"ref/distance": distance_sq.sqrt()} if measure else {}

    @torch.no_grad()
    def state_dict(self) -> dict[str, torch.Tensor]:
        zero3, state = _is_zero3(), {}
        for name, _, ref in self.pairs:
            with _gathered([ref], zero3):
                if _is_writer(zero3):
                    state[name] = self.master.get(name, ref.data).detach().cpu().clone()
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        zero3 = _is_zero3()
        for name, _, ref in self.pairs:
            if name not in state:
                raise ValueError(f"The saved reference has no parameter `{name}`.")
            with _gathered([ref], zero3):
                if not _is_writer(zero3):
                    continue
                if ref.dtype != torch.float32:
                    self.master[name] = state[name].to(device="cpu" if zero3 else ref.device, dtype=torch.float32)
                ref.data.copy_(state[name])


def _lora_factors(layer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The parameters (B, A) of ``adapter`` in a LoRA layer; ΔW is linear in B.flatten(1) @ A.flatten(1)."""
    if adapter in layer.lora_A:
        return layer.lora_B[adapter].weight, layer.lora_A[adapter].weight
    return layer.lora_embedding_B[adapter], layer.lora_embedding_A[adapter]


class _LoraReference:
    """The reference as a LoRA adapter ``"ref"`` next to the policy's adapter in the same PeftModel.

    Its scaling is 1, so ΔW_ref = B_ref A_ref (up to the layer's fixed reshaping/transposition). The
    update mixes ΔW (see :func:`mix_low_rank`). Non-LoRA trainable adapter parameters
    (``modules_to_save``) are mixed elementwise, like a full model. The reference factors are kept in
    fp32 in ``master`` (the policy adapter is fp32 unless PEFT was told otherwise).
    """

    def __init__(self, model, rank: int | None, ref_update: str):
        from peft import LoraConfig
        from peft.tuners.lora import LoraLayer

        self.adapter = model.active_adapter
        config = model.peft_config[self.adapter]
        if not isinstance(config, LoraConfig):
            raise NotImplementedError(
                f"TRDPOTrainer supports LoRA PEFT policies; got a {type(config).__name__}. Merge the adapter into the "
                "model and train it in full, or use LoRA."
            )
        for option in ("use_dora", "lora_bias"):
            if getattr(config, option, False):
                raise ValueError(f"TRDPOTrainer does not support LoRA with `{option}=True`: its delta is not B·A·s.")
        policy_rank = max([config.r, *config.rank_pattern.values()])
        self.rank = rank or (2 * policy_rank if ref_update == "soft" else policy_rank)
        if REF_ADAPTER in model.peft_config:  # TRL adds a copy of a pre-trained adapter; ours has its own rank
            model.delete_adapter(REF_ADAPTER)
        ref_config = copy.deepcopy(config)
        ref_config.r, ref_config.lora_alpha, ref_config.use_rslora = self.rank, self.rank, False  # scaling 1
        ref_config.rank_pattern, ref_config.alpha_pattern, ref_config.inference_mode = {}, {}, True
        # TRL disables dropout before this adapter exists; without this the reference forward (run in train mode)
        # would apply the policy's LoRA dropout and give noisy reference log-probs.
        ref_config.lora_dropout = 0.0
        model.add_adapter(REF_ADAPTER, ref_config)
        model.set_adapter(self.adapter)
        for name, param in model.named_parameters():
            if f".{REF_ADAPTER}." in name:
                param.requires_grad_(False)

        self.layers = [
            (name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer) and self.adapter in m.scaling
        ]
        params = dict(model.named_parameters())
        lora_names = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"}
        self.extras = []  # (name, policy param, reference param): elementwise adapter parameters
        for name, param in params.items():
            parts = name.split(".")
            if self.adapter not in parts or lora_names & set(parts):
                continue
            ref_name = ".".join(REF_ADAPTER if p == self.adapter else p for p in parts)
            if ref_name not in params or _shape(params[ref_name]) != _shape(param):
                raise ValueError(f"Adapter parameter `{name}` has no matching reference parameter `{ref_name}`.")
            self.extras.append((name, param, params[ref_name]))
        self.master: dict[str, torch.Tensor] = {}
        self.update(1.0)  # start from the policy: ΔW_ref = ΔW

    @torch.no_grad()
    def update(self, alpha: float, measure: bool = True) -> dict[str, float]:
        """Mix the reference adapter towards the policy's; with ``measure``, also return the logged values."""
        zero3 = _is_zero3()
        distance_sq, worst_error = _SumOfSquares(), 0.0
        for name, layer in self.layers:
            policy_b, policy_a = _lora_factors(layer, self.adapter)
            ref_b, ref_a = _lora_factors(layer, REF_ADAPTER)
            with _gathered([policy_b, policy_a, ref_b, ref_a], zero3):
                if not _is_writer(zero3):
                    continue
                policy = (policy_b.data.flatten(1), policy_a.data.flatten(1), float(layer.scaling[self.adapter]))
                ref = (
                    self.master.get(f"{name}.lora_B", ref_b.data.flatten(1)),
                    self.master.get(f"{name}.lora_A", ref_a.data.flatten(1)),
                    1.0,
                )
                if measure:
                    distance_sq.add(low_rank_distance_sq(policy, ref))
                parts = [(policy[0], policy[1], alpha * policy[2])] + (
                    [(ref[0], ref[1], 1.0 - alpha)] if alpha < 1.0 else []
                )
                new_b, new_a, error = mix_low_rank(parts, self.rank)
                worst_error = max(worst_error, error)
                self._store(name, ref_b, ref_a, new_b, new_a)
        for name, param, ref in self.extras:
            with _gathered([param, ref], zero3):
                if not _is_writer(zero3):
                    continue
                target = self.master.setdefault(name, ref.data.float().clone())
                policy = param.data.to(device=target.device, dtype=torch.float32)
                distance_sq.add(mix_group_([target], [policy], alpha, measure))
                ref.data.copy_(target)
        return {"ref/distance": distance_sq.sqrt(), "ref/truncation_error": worst_error} if measure else {}

    def _store(self, name, ref_b, ref_a, new_b, new_a) -> None:
        self.master[f"{name}.lora_B"], self.master[f"{name}.lora_A"] = new_b, new_a
        ref_b.data.copy_(new_b.view_as(ref_b))
        ref_a.data.copy_(new_a.view_as(ref_a))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: value.detach().cpu().clone() for key, value in self.master.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        zero3 = _is_zero3()
        for name, layer in self.layers:
            for key in (f"{name}.lora_B", f"{name}.lora_A"):
                if key not in state:
                    raise ValueError(f"The saved reference adapter has no tensor `{key}`.")
            ref_b, ref_a = _lora_factors(layer, REF_ADAPTER)
            with _gathered([ref_b, ref_a], zero3):
                if _is_writer(zero3):
                    device = ref_b.device
                    self._store(
                        name, ref_b, ref_a, state[f"{name}.lora_B"].to(device), state[f"{name}.lora_A"].to(device)
                    )
        for name, _, ref in self.extras:
            if name not in state:
                raise ValueError(f"The saved reference adapter has no tensor `{name}`.")
            with _gathered([ref], zero3):
                if _is_writer(zero3):
                    self.master[name] = state[name].to(ref.device)
                    ref.data.copy_(self.master[name])


# ----------------------------------------------------------------------------------------------------------------------
# Callback and trainer
# ----------------------------------------------------------------------------------------------------------------------


class TRDPOReferenceCallback(TrainerCallback):
    """Applies the TR-DPO reference update at the end of optimizer steps, and saves/loads the reference.

    Soft: every step, θ_ref ← α·θ + (1 − α)·θ_ref. Hard: when ``global_step % tau == 0``, θ_ref ← θ.
    An update on a step that logs (``control.should_log``, set by the trainer's flow callback, which
    runs before this one) appends ``ref/distance`` (and, for LoRA, ``ref/truncation_error``) to
    ``metrics``, which the trainer logs with its own; the other updates skip that measurement, which
    would cost a pass over both models.

    Args:
        reference: the paired policy/reference state (built by [`TRDPOTrainer`]).
        ref_update: ``"soft"`` or ``"hard"``.
        alpha: α of the soft update.
        tau: τ of the hard update.
        metrics: where to append the logged values (the trainer's ``_metrics["train"]``), or None.
    """

    def __init__(self, reference, ref_update: str, alpha: float, tau: int, metrics: dict | None = None):
        self.reference = reference
        self.ref_update = ref_update
        self.alpha = alpha
        self.tau = tau
        self.metrics = metrics

    def on_step_end(self, args, state, control, **kwargs):
        measure = self.metrics is not None and control.should_log
        if self.ref_update == "soft":
            values = self.reference.update(self.alpha, measure)
        elif state.global_step % self.tau == 0:
            values = self.reference.update(1.0, measure)
        else:
            return
        for key, value in values.items():  # empty unless measured, and only measured with `metrics`
            self.metrics[key].append(value)

    def save(self, folder: str, write: bool) -> None:
        """Save the reference (fp32 masters where kept) to ``folder/trdpo_reference.safetensors``."""
        state = self.reference.state_dict()  # every rank joins the ZeRO-3 gathers
        if write:
            metadata = {"ref_update": self.ref_update, "alpha": str(self.alpha), "tau": str(self.tau)}
            save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, REFERENCE_FILE), metadata)

    def load(self, folder: str) -> None:
        """Restore the reference saved by :meth:`save` in ``folder``."""
        path = os.path.join(folder, REFERENCE_FILE)
        if not os.path.isfile(path):
            raise ValueError(
                f"Checkpoint {folder!r} has no {REFERENCE_FILE}, so the TR-DPO reference cannot be restored (it was not "
                "saved by TRDPOTrainer). Resuming would silently restart the reference from the initial policy."
            )
        self.reference.load_state_dict(load_file(path))


class TRDPOTrainer(DPOTrainer):
    """A [`~trl.DPOTrainer`] whose reference policy follows the policy during training (TR-DPO).

    Paper: [Learn Your Reference Model for Real Good Alignment](https://huggingface.co/papers/2404.09656).
    Same constructor, datasets and loss types as `DPOTrainer` (TR-IPO is `loss_type="ipo"`); the update
    is set by [`TRDPOConfig`] (`ref_update`, `alpha`, `tau`) and applied by [`TRDPOReferenceCallback`].

    - Full model: the reference is `ref_model`, or, when it is None, a deep copy of the policy made
      before training (TRL would reload it from `config._name_or_path`, which fails for in-memory
      models). Its parameters must match the policy's by name and shape.
    - PEFT (LoRA): pass `peft_config` or a `PeftModel` and no `ref_model`; the reference is the adapter
      `"ref"`, started as a copy of the policy's ΔW.
    - FSDP is not supported.
    - Memory: a bf16/fp16 full reference gets an fp32 master copy (4 bytes per parameter, on the CPU of
      rank 0 under ZeRO-3) so that small α steps are not rounded away; an fp32 reference needs none. A
      LoRA reference keeps fp32 factors of rank `ref_adapter_rank`.

    Args:
        model: the policy, as for `DPOTrainer` (a Hub id, a `PreTrainedModel` or a `PeftModel`).
        ref_model: the reference model (full-model training only), or None.
        args: a [`TRDPOConfig`].
        **kwargs: the other `DPOTrainer` arguments (`train_dataset`, `processing_class`, `peft_config`, ...).

    Examples:

    >>> from hf_ext import TRDPOConfig, TRDPOTrainer
    >>> from hf_ext.data.preference import preference_dataset
    >>> from hf_ext.testing import get_tiny_tokenizer, tiny_gpt2
    >>> args = TRDPOConfig("/tmp/trdpo-doc", ref_update="soft", alpha=0.6, max_steps=2, per_device_train_batch_size=2,
    ...                    bf16=False, use_cpu=True, gradient_checkpointing=False, report_to="none", max_length=32,
    ...                    save_strategy="no", disable_tqdm=True)
    >>> trainer = TRDPOTrainer(tiny_gpt2(), args=args, train_dataset=preference_dataset(8),
    ...                        processing_class=get_tiny_tokenizer())
    >>> _ = trainer.train()  # doctest: +ELLIPSIS
    {'train_runtime': ...}
    >>> [log["ref/distance"] > 0 for log in trainer.state.log_history if "ref/distance" in log]
    [True]
    """

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
        from accelerate.utils import is_peft_model

        if args is None:
            raise ValueError("`args` must be a TRDPOConfig (it carries `ref_update`, `alpha` and `tau`), got None.")
        if not isinstance(args, TRDPOConfig):
            raise TypeError(f"`args` must be a TRDPOConfig, got {type(args).__name__}.")
        uses_peft = kwargs.get("peft_config") is not None or is_peft_model(model)
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
        if self.is_fsdp_enabled:
            raise NotImplementedError("TRDPOTrainer does not support FSDP; use DDP or DeepSpeed ZeRO.")

        policy = self.accelerator.unwrap_model(self.model)
        if is_peft_model(policy):
            reference = _LoraReference(policy, args.ref_adapter_rank, args.ref_update)
        else:
            reference = _FullReference(policy, self.accelerator.unwrap_model(self.ref_model))
        self.ref_callback = TRDPOReferenceCallback(
            reference, args.ref_update, args.alpha, args.tau, metrics=self._metrics["train"]
        )
        self.add_callback(self.ref_callback)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # The reference is training state, like the optimizer's: saved and restored with it.
        super()._save_optimizer_and_scheduler(output_dir)
        self.ref_callback.save(output_dir, write=self.args.should_save)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self.ref_callback.load(checkpoint)


__all__ = ["TRDPOConfig", "TRDPOReferenceCallback", "TRDPOTrainer", "mix_group_", "mix_low_rank", "pair_parameters"]
