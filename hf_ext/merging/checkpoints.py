"""Streamed interpolation of two checkpoints, shard by shard, into new sharded safetensors folders.

Memory stays near one output shard, whatever the checkpoint size:

- the output shards are planned from the inputs' headers before anything is read
  (``huggingface_hub.split_state_dict_into_shards_factory``, as ``save_torch_state_dict`` plans them);
- inputs are read from memory-mapped safetensors files, each tensor through its own short-lived ``safe_open``
  map, so a file's pages leave the process as soon as that tensor is done;
- each output shard is computed into memory (in float32 chunks that bound the temporaries) and written with
  ``safetensors.torch.save_file``; with several alphas, each shard is written for every alpha before the next
  shard is read, so the inputs read again come from the page cache and one shard is held at a time.

Everything is checked before the first byte is written, and the outputs appear all at once
(:func:`hf_ext.atomic.atomic_folder`).
"""

import fnmatch
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from huggingface_hub import StateDictSplit, split_state_dict_into_shards_factory
from safetensors.torch import save_file

from hf_ext.atomic import atomic_folder, check_output_folder
from hf_ext.merging.interpolation import check_alpha, check_tensor_specs, lerp
from hf_ext.model_card import save_model_card

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_BIN_WEIGHTS_NAME = "pytorch_model.bin"
_BIN_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"

# Files copied from `tuned` into every output: configs, tokenizer, chat template, remote code.
_COPIED_FROM_TUNED = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "*.model", "chat_template.*", "*.py",
)

# safetensors header dtypes this module reads (and, for the floating ones, may cast to)
_SAFETENSORS_TO_DTYPE = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}

Spec = tuple[tuple[int, ...], torch.dtype]

_CHUNK_ELEMENTS = 1 << 22  # 4M elements: 16 MB per float32 temporary


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def resolve_model_folder(source: str | os.PathLike, arg: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local folder as is, or a Hub repo id fetched with ``snapshot_download`` (weights, configs, tokenizer only).

    Pickled ``.bin`` weights are fetched only when the repo has no safetensors weights.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    patterns = [*_COPIED_FROM_TUNED, "*.safetensors", SAFE_WEIGHTS_INDEX_NAME]
    try:
        folder = Path(snapshot_download(str(source), allow_patterns=patterns, cache_dir=cache_dir))
        if not (folder / SAFE_WEIGHTS_NAME).is_file() and not (folder / SAFE_WEIGHTS_INDEX_NAME).is_file():
            patterns = [*_COPIED_FROM_TUNED, "*.bin", _BIN_WEIGHTS_INDEX_NAME]
            folder = Path(snapshot_download(str(source), allow_patterns=patterns, cache_dir=cache_dir))
    except (ValueError, OSError) as err:  # HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError, ...
        raise ValueError(f"`{arg}`={str(source)!r} is neither a local folder nor a Hub repo that could be fetched ({err}).") from err
    return folder


def _read_specs(path: Path) -> dict[str, Spec]:
    """``{name: (shape, dtype)}`` of one weight file, in the file's order, from its header only."""
    if path.suffix != ".safetensors":
        return {name: (tuple(t.shape), t.dtype) for name, t in _load_bin(path).items()}
    from safetensors import safe_open

    specs = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for name in f.keys():
            view = f.get_slice(name)
            if view.get_dtype() not in _SAFETENSORS_TO_DTYPE:
                raise ValueError(f"Tensor {name!r} in {path} has dtype {view.get_dtype()}; supported: {sorted(_SAFETENSORS_TO_DTYPE)}.")
            specs[name] = (tuple(view.get_shape()), _SAFETENSORS_TO_DTYPE[view.get_dtype()])
    return specs


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    # weights_only refuses arbitrary pickled objects; mmap leaves the tensors on disk until touched
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


class Checkpoint:
    """The weights of one model folder: which file holds which tensor and their specs, and reading one tensor.

    Args:
        folder: a folder with ``model.safetensors``, ``model.safetensors.index.json``,
            ``pytorch_model.bin`` or ``pytorch_model.bin.index.json`` (tried in that order).
        arg: the argument name quoted in errors.
    """

    def __init__(self, folder: Path, arg: str):
        self.folder = folder
        for index_name, single_name in ((SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME), (_BIN_WEIGHTS_INDEX_NAME, _BIN_WEIGHTS_NAME)):
            if (folder / index_name).is_file():
                weight_map = json.loads((folder / index_name).read_text())["weight_map"]
                files = list(dict.fromkeys(weight_map.values()))
                break
            if (folder / single_name).is_file():
                files = [single_name]
                break
        else:
            raise ValueError(
                f"`{arg}`={str(folder)!r} has no weights: expected {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME}, "
                f"{_BIN_WEIGHTS_NAME} or {_BIN_WEIGHTS_INDEX_NAME}."
            )
        # name -> (file, spec), in file order then in each file's own order
        self.tensors: dict[str, tuple[str, Spec]] = {}
        for file in files:
            self.tensors.update({name: (file, spec) for name, spec in _read_specs(folder / file).items()})
        config = folder / "config.json"
        self.config = json.loads(config.read_text()) if config.is_file() else None
        self._bin_file, self._bin_tensors = None, None

    def specs(self) -> dict[str, Spec]:
        return {name: spec for name, (_, spec) in self.tensors.items()}

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name``, backed by a memory map that lives only as long as the tensor does.

        A ``.bin`` file is loaded (memory-mapped) once and kept until a tensor of another file is asked for.
        """
        file = self.tensors[name][0]
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(self.folder / file), framework="pt", device="cpu") as f:
                return f.get_tensor(name)
        if self._bin_file != file:
            self._bin_file, self._bin_tensors = file, _load_bin(self.folder / file)
        return self._bin_tensors[name]


def check_same_architecture(base: Checkpoint, tuned: Checkpoint) -> None:
    """Raise ValueError if both folders have a config.json and their model_type or architectures differ."""
    if base.config is None or tuned.config is None:
        return
    for key in ("model_type", "architectures"):
        if base.config.get(key) != tuned.config.get(key):
            raise ValueError(f"`base` and `tuned` are different architectures: {key} {base.config.get(key)!r} vs {tuned.config.get(key)!r}.")


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _nbytes(spec: Spec) -> int:
    shape, dtype = spec
    return int(torch.Size(shape).numel()) * dtype.itemsize


def plan_shards(specs: dict[str, Spec], shard_size: int | str) -> StateDictSplit:
    """Plan output shards from tensor specs with ``huggingface_hub``'s splitter, as ``save_torch_state_dict`` does.

    Shards are filled greedily in the given order; a tensor larger than ``shard_size`` gets a shard of its own.
    One shard is named ``model.safetensors``; several ``model-00001-of-0000N.safetensors``.
    """
    return split_state_dict_into_shards_factory(
        specs, get_storage_size=_nbytes, filename_pattern=SAFE_WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors"),
        max_shard_size=shard_size,
    )


def _write_index(folder: Path, plan: StateDictSplit) -> None:
    """``model.safetensors.index.json`` when there are several shards, in the layout transformers reads."""
    if plan.is_sharded:
        index = {"metadata": plan.metadata, "weight_map": plan.tensor_to_filename}
        (folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _copy_tuned_files(tuned: Path, folder: Path, dtype: torch.dtype | None) -> None:
    for path in sorted(tuned.iterdir()):
        if path.is_file() and any(fnmatch.fnmatch(path.name, p) for p in _COPIED_FROM_TUNED):
            shutil.copyfile(path, folder / path.name)  # copyfile follows the Hub cache's symlinks
    config = folder / "config.json"
    if dtype is not None and config.is_file():
        data = json.loads(config.read_text())
        data["dtype"] = str(dtype).removeprefix("torch.")
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def _parse_alphas(alpha) -> tuple[list[float], bool]:
    if isinstance(alpha, Sequence) and not isinstance(alpha, str):
        if len(alpha) == 0:
            raise ValueError("`alpha` must be a number or a non-empty sequence of numbers, got an empty sequence.")
        alphas = [check_alpha(a) for a in alpha]
        names = [alpha_folder_name(a) for a in alphas]
        if len(set(names)) != len(names):
            raise ValueError(f"`alpha` has repeated values: {alphas}.")
        return alphas, True
    return [check_alpha(alpha)], False


def alpha_folder_name(alpha: float) -> str:
    """The sub-folder of ``out_dir`` for ``alpha`` when several alphas are written: ``alpha_0.5``, ``alpha_-1``."""
    return f"alpha_{alpha:g}"


def _check_shard_size(shard_size: int | str) -> int | str:
    if isinstance(shard_size, str):
        try:
            plan_shards({}, shard_size)  # parses the size as huggingface_hub does, before any work
        except ValueError as err:
            raise ValueError(f"`shard_size` must be bytes or a size like '5GB', got {shard_size!r} ({err}).") from err
        return shard_size
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size <= 0:
        raise ValueError(f"`shard_size` must be a positive number of bytes or a size like '5GB', got {shard_size!r}.")
    return shard_size


def _parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype not in _SAFETENSORS_TO_DTYPE.values():
        raise ValueError(f"`dtype` must be None or one of float32, float16, bfloat16, float64, got {dtype!r}.")
    return dtype


def _check_no_overlap(out_dir: Path, inputs: list[Path]) -> None:
    resolved = out_dir.resolve()
    for folder in inputs:
        folder = folder.resolve()
        if resolved == folder or resolved.is_relative_to(folder) or folder.is_relative_to(resolved):
            raise ValueError(f"`out_dir`={str(out_dir)!r} overlaps the input folder {str(folder)!r}.")


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def interpolate_checkpoints(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    alpha: float | Sequence[float],
    out_dir: str | os.PathLike,
    *,
    shard_size: int | str = "5GB",
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> Path | list[Path]:
    """Write theta = theta_base + alpha * (theta_tuned - theta_base) for two checkpoints, streamed shard by shard.

    Paper: https://arxiv.org/abs/2211.12092. Floating tensors are interpolated in float32 and cast
    back (``alpha = 0`` and ``alpha = 1`` reproduce the inputs bit for bit); integer and boolean
    tensors are copied from ``tuned``. Checkpoints cannot tell buffers from parameters, so every
    saved floating tensor is interpolated. Both inputs must hold the same tensors: use
    :func:`~hf_ext.merging.interpolate_models` for models with a head only one of them has.

    Each output folder gets sharded safetensors (with ``model.safetensors.index.json`` when there
    are several shards), ``tuned``'s config, generation config, tokenizer files and remote code, and
    a model card recording base, tuned and alpha. Memory stays near one output shard (plus the
    current tensor's inputs), for any number of alphas.

    Args:
        base: the pre-trained model: a local folder or a Hub repo id (fetched with
            ``huggingface_hub.snapshot_download``; ``.bin`` weights load with ``weights_only=True``).
        tuned: the fine-tuned model, same architecture and tensors as ``base``.
        alpha: one coefficient, or a sequence of them, all written in one run: each output shard is
            written for every alpha before the next is read, so its inputs are read again from the
            page cache rather than from disk.
        out_dir: the output model folder for one alpha; for a sequence, the folder that gets one
            sub-folder per alpha (``alpha_0.5``, ``alpha_-1``, see :func:`alpha_folder_name`).
        shard_size: the largest output shard, in bytes or as a string like ``"5GB"`` (parsed as
            ``huggingface_hub`` parses ``max_shard_size``); a tensor larger than that gets a shard of its own.
        dtype: cast floating tensors to this dtype on output (and record it in config.json);
            None keeps each tensor's dtype.
        overwrite: replace a non-empty ``out_dir`` (it is only replaced once the new one is complete).
        cache_dir: the Hub cache for repo ids (default: huggingface_hub's).
        progress: show a tqdm progress bar over the bytes written.

    Returns:
        The output folder, or the list of per-alpha folders when ``alpha`` is a sequence.

    Raises:
        TypeError: an alpha is not a number.
        ValueError: an alpha is not finite; an input cannot be found or has no weights; the architectures, tensor names,
            shapes or dtypes differ (listing the first offenders); ``out_dir`` is not empty
            without ``overwrite`` or overlaps an input; a bad ``shard_size`` or ``dtype``. All
            raised before anything is written.

    Examples:
        >>> import tempfile
        >>> from hf_ext.testing import tiny_gpt2
        >>> tmp = Path(tempfile.mkdtemp())
        >>> tiny_gpt2(seed=0).save_pretrained(tmp / "base"); tiny_gpt2(seed=1).save_pretrained(tmp / "tuned")
        >>> [p.name for p in interpolate_checkpoints(tmp / "base", tmp / "tuned", [0.5, 2.0], tmp / "out")]
        ['alpha_0.5', 'alpha_2']
    """
    # 1. Arguments, inputs and every check, before anything is written.
    alphas, several = _parse_alphas(alpha)
    shard_size = _check_shard_size(shard_size)
    dtype = _parse_dtype(dtype)
    out_dir = Path(out_dir).expanduser()
    check_output_folder(out_dir, overwrite=overwrite)  # fail fast, before any download
    base_folder = resolve_model_folder(base, "base", cache_dir)
    tuned_folder = resolve_model_folder(tuned, "tuned", cache_dir)
    _check_no_overlap(out_dir, [base_folder, tuned_folder])
    base_ckpt, tuned_ckpt = Checkpoint(base_folder, "base"), Checkpoint(tuned_folder, "tuned")
    check_same_architecture(base_ckpt, tuned_ckpt)
    check_tensor_specs(base_ckpt.specs(), tuned_ckpt.specs())

    # 2. Plan the output shards from the headers (the same plan for every alpha).
    out_specs = {
        name: (shape, dtype if dtype is not None and spec_dtype.is_floating_point else spec_dtype)
        for name, (shape, spec_dtype) in base_ckpt.specs().items()
    }
    plan = plan_shards(out_specs, shard_size)

    # 3. Write into a temporary folder beside out_dir, renamed into place when complete. The card's `base_model`
    #    metadata (a Hub model id) is left out for a local folder, as TRL's cards do; the card's text names both.
    base_id = None if Path(base).expanduser().is_dir() else str(base)
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        folders = [tmp / alpha_folder_name(a) for a in alphas] if several else [tmp]
        for folder in folders:
            folder.mkdir(exist_ok=True)
        _write_shards(base_ckpt, tuned_ckpt, alphas, folders, plan, out_specs, progress)
        for folder, a in zip(folders, alphas, strict=True):
            _write_index(folder, plan)
            _copy_tuned_files(tuned_folder, folder, dtype)
            save_model_card(folder, "interpolation", base_model=base_id, base=str(base), tuned=str(tuned), alpha=a)
    if several:
        return [out_dir / alpha_folder_name(a) for a in alphas]
    return out_dir


def _interpolate_tensor(base: Checkpoint, tuned: Checkpoint, name: str, alpha: float, out_dtype: torch.dtype) -> torch.Tensor:
    """theta(alpha) for tensor ``name``, in ``out_dtype``, computed in chunks of ``_CHUNK_ELEMENTS``.

    :func:`lerp` writes straight into the preallocated output (no temporary when the dtype is kept: without
    ``out=``, the temporaries fragment the heap and a 495 MB shard peaked about 380 MB higher, see
    BENCHMARKS.md); chunks bound the float32 temporaries of a dtype cast (a few times ``_CHUNK_ELEMENTS`` * 4
    bytes) whatever the tensor size. Integer and boolean tensors come from ``tuned``.
    """
    theta_tuned = tuned.get(name)
    if not theta_tuned.is_floating_point():
        return theta_tuned.clone()  # out of the map, so that the shard owns its tensors
    theta_base = base.get(name).reshape(-1)  # (N,) view of the map
    out = torch.empty(theta_tuned.shape, dtype=out_dtype)
    flat_out, flat_tuned = out.view(-1), theta_tuned.reshape(-1)
    for i in range(0, flat_tuned.numel(), _CHUNK_ELEMENTS):
        chunk = slice(i, i + _CHUNK_ELEMENTS)
        lerp(theta_base[chunk], flat_tuned[chunk], alpha, dtype=out_dtype, out=flat_out[chunk])
    return out


def _write_shards(
    base: Checkpoint,
    tuned: Checkpoint,
    alphas: list[float],
    folders: list[Path],
    plan: StateDictSplit,
    out_specs: dict[str, Spec],
    progress: bool,
) -> None:
    """Compute each planned shard for every alpha in turn and write it with ``save_file``; one shard is held at a time."""
    from tqdm.auto import tqdm

    total = plan.metadata["total_size"] * len(alphas)
    with tqdm(total=total, unit="B", unit_scale=True, desc="interpolating", disable=not progress) as bar:
        for file, names in plan.filename_to_tensors.items():
            for alpha, folder in zip(alphas, folders, strict=True):
                shard = {name: _interpolate_tensor(base, tuned, name, alpha, out_specs[name][1]) for name in names}
                save_file(shard, folder / file, metadata={"format": "pt"})
                bar.update(sum(_nbytes(out_specs[name]) for name in names))
                del shard


__all__ = [
    "Checkpoint",
    "alpha_folder_name",
    "check_same_architecture",
    "interpolate_checkpoints",
    "plan_shards",
    "resolve_model_folder",
]
