"""AoT P-Tuning as a PEFT tuner ("Ahead-of-Time P-Tuning", Gavrilov & Balagansky, arXiv 2305.10835)."""

from __future__ import annotations

import re
from contextlib import contextmanager
from functools import partial

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from torch import nn
from transformers import PreTrainedModel

from .config import AoTPTuningConfig
from .layer import AoTPTuningLayer, AoTTokenIds, _rows_by_adapter

# Where transformers keeps its Transformer layers: BERT/RoBERTa/DeBERTa `encoder.layer`, Llama `model.layers`,
# GPT-2 `transformer.h`, T5 `encoder.block` and `decoder.block`, others `blocks`.
LAYER_LIST_NAMES = ("layer", "layers", "h", "block", "blocks")

# Tags of the model card that PEFT's `save_pretrained` / `push_to_hub` writes: PEFT adds the base model's
# `model_tags` to its card, and `add_model_tags` is transformers' public way to set them.
MODEL_CARD_TAGS = ("hf-ext", "aot-ptuning", "arxiv:2305.10835")


def _is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def find_layers_pattern(model: nn.Module) -> str:
    """A regex that matches the names of the model's Transformer layers, e.g. ``roberta\\.encoder\\.layer\\.\\d+``.

    The layers are the entries of the outermost `nn.ModuleList`s named one of `LAYER_LIST_NAMES`: one list in an
    encoder-only or decoder-only model, two in an encoder-decoder (`config.is_encoder_decoder`: its encoder's and
    its decoder's).

    Raises:
        ValueError: not as many such lists as expected.
    """
    lists = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name.rpartition(".")[2] in LAYER_LIST_NAMES
    ]
    outermost = [name for name in lists if not any(name.startswith(other + ".") for other in lists)]
    expected = 2 if _is_encoder_decoder(model) else 1
    if len(outermost) != expected:
        found = f"found {outermost}" if outermost else "found none"
        raise ValueError(
            f"AoT P-Tuning could not find the Transformer layers of {type(model).__name__}: it looked for "
            f"{'two (encoder and decoder)' if expected == 2 else 'one'} outermost `nn.ModuleList` named one of "
            f"{list(LAYER_LIST_NAMES)} and {found}. Pass `target_modules` with the layers' names or a regex."
        )
    return "|".join(rf"{re.escape(name)}\.\d+" for name in outermost)


def _input_embedding(module: nn.Module) -> nn.Embedding:
    embedding = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    if not isinstance(embedding, nn.Embedding):
        raise ValueError(
            f"AoT P-Tuning needs a model whose `get_input_embeddings()` returns an `nn.Embedding` (the token ids are "
            f"taken from its input), got {type(embedding).__name__} from {type(module).__name__}."
        )
    return embedding


def _stacks(model: nn.Module) -> dict[str, nn.Module]:
    """The stacks of layers, by module path, each with its own input embedding and token ids: the model itself
    (path ``""``), or an encoder-decoder's encoder and decoder."""
    if not _is_encoder_decoder(model):
        return {"": model}
    paths = {id(module): name for name, module in model.named_modules()}
    stacks = {}
    for getter in ("get_encoder", "get_decoder"):
        stack = getattr(model, getter)() if hasattr(model, getter) else None
        if id(stack) not in paths:
            raise ValueError(
                f"AoT P-Tuning on the encoder-decoder {type(model).__name__} needs `{getter}()` to return its "
                f"{getter[4:]} (a submodule with its own input embedding), got {type(stack).__name__}."
            )
        stacks[paths[id(stack)]] = stack
    return stacks


def _inject_adapter_names(module, args, kwargs, adapter_names):
    return args, {**kwargs, "adapter_names": adapter_names}


def _route_by_adapter(wrapper: ModulesToSaveWrapper, adapter_names: list[str], hidden_states, *args, **kwargs):
    """Run each example through the head copy of its adapter (`"__base__"`: the original head).

    PEFT's own mixed-batch path for `modules_to_save` handles only single `nn.Linear`/`nn.Embedding`/conv
    modules, while classification heads such as `RobertaClassificationHead` are small stacks of them.
    """
    output = None
    for name, rows in _rows_by_adapter(adapter_names, hidden_states).items():
        head = wrapper.modules_to_save[name] if name in wrapper.modules_to_save else wrapper.original_module
        part = head(hidden_states[rows], *args, **kwargs)
        if output is None:
            output = part.new_empty((hidden_states.shape[0], *part.shape[1:]))
        output[rows] = part
    return output


class AoTPTuningModel(BaseTuner):
    """Adds AoT P-Tuning biases ``H_l <- H_l + P_l[x]`` before every Transformer layer of a model (paper Fig. 2).

    Built by `peft.get_peft_model(model, AoTPTuningConfig(...))` once `hf_ext` is imported, for encoder-only,
    decoder-only and encoder-decoder models. The token ids are taken from the input embedding of each layer's stack
    (a forward pre-hook: the model's, or an encoder-decoder's encoder's and decoder's), so the model must be called
    with `input_ids`; under `generate()` with a KV cache each new position uses its own id. The ids are held for
    the forward pass in progress, so one model serves one forward pass at a time (not several threads at once).

    Several adapters can serve one batch: pass `adapter_names=[name_per_example]` (`"__base__"` for none) to
    the `PeftModel`'s forward or `generate`, as with LoRA. Heads trained through `modules_to_save` follow the
    same per-example choice. Like PEFT's own mixed-batch hooks, this re-routes shared modules for the length of
    the call (undone in a `finally`).

    For inference call `collapse()`: each layer then holds ``P_l`` as a table and costs one gather and one add.
    A collapsed model is for inference only (see `collapse()` for the rules); `uncollapse()` drops the tables. AoT
    biases depend on the token ids, so they cannot be merged into the weights: `merge_and_unload()` raises,
    `unload()` returns the base model.

    The model card is PEFT's (written by `save_pretrained` and `push_to_hub`): the adapter tags the base model
    with `MODEL_CARD_TAGS` (``hf-ext``, ``aot-ptuning``, ``arxiv:2305.10835``), which PEFT adds to the card's
    ``library_name: peft``, ``base_model`` and its own tags; `unload()` takes them off again.

    Args:
        model: a transformers model with `get_input_embeddings()` and a list of Transformer layers.
        config: the `AoTPTuningConfig`.
        adapter_name: name of the first adapter.

    Examples:

    ```python
    >>> import torch, hf_ext
    >>> from peft import get_peft_model
    >>> from hf_ext import AoTPTuningConfig
    >>> from hf_ext.testing import tiny_gpt2
    >>> model = get_peft_model(tiny_gpt2(), AoTPTuningConfig(task_type="CAUSAL_LM", reparametrization="kronecker"))
    >>> model.eval().base_model.collapse()  # tables for inference
    >>> model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False).shape
    torch.Size([1, 5])

    ```
    """

    prefix: str = "aot_"
    tuner_layer_cls = AoTPTuningLayer
    target_module_mapping: dict = {}  # the layers are found in the model, see `find_layers_pattern`

    def _prepare_adapter_config(self, peft_config: AoTPTuningConfig, model_config: dict) -> AoTPTuningConfig:
        return peft_config  # `target_modules` needs the model itself, so it is filled in by `_prepare_model`

    def _prepare_model(self, peft_config: AoTPTuningConfig, model: nn.Module) -> None:
        """Check the vocabulary, find the layers and install the token-id hooks, before any module is replaced."""
        stacks = _stacks(model)
        embeddings = {path: _input_embedding(stack) for path, stack in stacks.items()}
        if peft_config.vocab_size is None:
            peft_config.vocab_size = _input_embedding(model).num_embeddings
        for path, embedding in embeddings.items():
            if embedding.num_embeddings != peft_config.vocab_size:
                where = f"the input embedding of `{path}`" if path else "the model's input embedding"
                raise ValueError(
                    f"The AoT P-Tuning adapter has tables of `vocab_size`={peft_config.vocab_size} rows, but {where} "
                    f"has {embedding.num_embeddings} rows: the adapter was trained for another vocabulary."
                )
        if peft_config.target_modules is None:
            peft_config.target_modules = find_layers_pattern(model)
        if isinstance(model, PreTrainedModel):
            model.add_model_tags(list(MODEL_CARD_TAGS))
        if "_aot_token_ids" not in self.__dict__:
            self._aot_token_ids: dict[str, AoTTokenIds] = {}  # stack path -> its ids; every adapter has this size
            for path, stack in stacks.items():
                self._aot_token_ids[path] = AoTTokenIds(embeddings[path], peft_config.vocab_size)
                self._aot_token_ids[path].install(stack)

    def _token_ids_of(self, layer_name: str) -> AoTTokenIds:
        """The token ids of the stack that the layer named `layer_name` belongs to."""
        for path, token_ids in self._aot_token_ids.items():
            if not path or layer_name.startswith(path + "."):
                return token_ids
        raise ValueError(
            f"`target_modules` matched {layer_name!r}, which is in neither stack of this encoder-decoder "
            f"({list(self._aot_token_ids)}): AoT P-Tuning adds biases chosen by the token ids of the layer's stack."
        )

    def _create_and_replace(
        self,
        peft_config: AoTPTuningConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        hidden_size = self.model.config.hidden_size
        if isinstance(target, AoTPTuningLayer):
            target.update_layer(adapter_name, peft_config, hidden_size)
            return
        new_module = AoTPTuningLayer(target, self._token_ids_of(current_key))
        new_module.update_layer(adapter_name, peft_config, hidden_size)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # A Transformer layer has no single `weight` to copy or take the device from (PEFT's generic version
        # assumes one); `update_layer` already put the adapter on the layer's device.
        setattr(parent, child_name, new_module)

    def _aot_layers(self) -> list[AoTPTuningLayer]:
        return [module for module in self.model.modules() if isinstance(module, AoTPTuningLayer)]

    def collapse(self, adapter_names: list[str] | None = None) -> None:
        """Compute every layer's table ``P_l`` once for inference (all adapters if `adapter_names` is None).

        A collapsed model is for inference:

        - `collapse()` needs eval mode (`model.eval()`), and `model.train()` raises while a table is collapsed;
          call `uncollapse()` first.
        - A forward pass that records gradients for a collapsed adapter's weights raises: run inference under
          `torch.no_grad()` or `torch.inference_mode()` (`generate()` does), or load the adapter frozen
          (`PeftModel.from_pretrained` does).
        - The tables are a snapshot: after changing the weights in place (`load_state_dict`, loading an adapter
          under the same name, resizing the input embedding of an FC adapter), call `collapse()` again.

        A `reparametrization="none"` adapter is a table already and is looked up as it is.
        """
        if self.training:
            raise ValueError("`collapse()` is for inference: call `model.eval()` first.")
        names = self._known_adapters(adapter_names)
        for layer in self._aot_layers():
            for name in names:
                if name in layer.aot_reparam:
                    layer.collapse(name)

    def uncollapse(self, adapter_names: list[str] | None = None) -> None:
        """Drop the tables `collapse()` computed (all adapters if `adapter_names` is None): the reparametrizations
        run again, and the model can be trained."""
        names = self._known_adapters(adapter_names)
        for layer in self._aot_layers():
            for name in names:
                if name in layer.aot_reparam:
                    layer.uncollapse(name)

    def _known_adapters(self, adapter_names: list[str] | None) -> list[str]:
        names = list(self.peft_config) if adapter_names is None else list(adapter_names)
        unknown = sorted(set(names) - set(self.peft_config))
        if unknown:
            raise ValueError(f"`adapter_names` contains unknown adapters {unknown}; known: {sorted(self.peft_config)}.")
        return names

    def train(self, mode: bool = True):
        """`nn.Module.train`, refused while tables are collapsed (a collapsed model is for inference)."""
        if mode and any(layer.is_collapsed() for layer in self._aot_layers()):
            raise ValueError(
                "The AoT P-Tuning tables are collapsed for inference (`collapse()`); call `uncollapse()` before "
                "training."
            )
        return super().train(mode)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """Route ``adapter_names=[...]`` (one per example) to the AoT layers and `modules_to_save` heads."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(f"`adapter_names` must be a list of str, one per example, got {adapter_names!r}.")
        unknown = sorted({name for name in adapter_names if name != "__base__"} - set(self.peft_config))
        if unknown:
            raise ValueError(
                f"`adapter_names` contains unknown adapters {unknown}; known: {sorted(self.peft_config)} and "
                "'__base__' (no adapter)."
            )
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            # generate() repeats each example num_beams times
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        adapter_names = list(adapter_names)
        handles, routed_heads = [], []
        try:
            for module in self.model.modules():
                if isinstance(module, ModulesToSaveWrapper):
                    # For this call only. An instance-level `forward` already there (accelerate's device hooks
                    # put one) is kept and put back, so `del` must not drop it.
                    routed_heads.append((module, module.__dict__.get("forward")))
                    module.forward = partial(_route_by_adapter, module, adapter_names)
                elif isinstance(module, (AoTPTuningLayer, AuxiliaryTrainingWrapper)):
                    hook = partial(_inject_adapter_names, adapter_names=adapter_names)
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module, previous_forward in routed_heads:
                if previous_forward is None:
                    del module.forward
                else:
                    module.forward = previous_forward

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """The adapter's weights; with `config.save_collapsed`, each layer's table in place of its reparametrization."""
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if not config.save_collapsed or config.reparametrization == "none":
            return to_return
        for name, layer in model.named_modules():
            if not isinstance(layer, AoTPTuningLayer) or adapter_name not in layer.aot_reparam:
                continue
            prefix = f"{name}.aot_reparam.{adapter_name}."
            to_return = {key: value for key, value in to_return.items() if not key.startswith(prefix)}
            with torch.no_grad():
                table = layer.aot_reparam[adapter_name].table(layer.token_ids.embedding.weight)
            to_return[prefix + "table_weight"] = table.contiguous()  # the parameter name of `AoTRawTable`
        return to_return

    def _check_merge_allowed(self) -> None:
        raise ValueError(
            "AoT P-Tuning biases depend on each position's token id, so they cannot be merged into the weights. "
            "Use `unload()` to get the base model back, or `collapse()` for fast inference."
        )

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        model = super()._unload_and_optionally_merge(merge, progressbar, safe_merge, adapter_names)
        for token_ids in self._aot_token_ids.values():
            token_ids.remove()
        if getattr(model, "model_tags", None):
            model.model_tags = [tag for tag in model.model_tags if tag not in MODEL_CARD_TAGS]
        return model


__all__ = ["AoTPTuningModel", "find_layers_pattern", "LAYER_LIST_NAMES", "MODEL_CARD_TAGS"]
