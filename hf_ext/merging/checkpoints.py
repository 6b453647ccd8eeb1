"""Streamed interpolation of two checkpoints, tensor by tensor, into new sharded safetensors folders.

Memory stays near one tensor of each model, whatever the checkpoint size:

- inputs are read from memory-mapped safetensors files, each tensor through its own short-lived
  ``safe_open`` map, so a file's pages leave the process as soon as that tensor is done;
- outputs are streamed straight into their files in chunks: the output shards are planned from the
  inputs' headers before anything is read, so each shard's safetensors header (names, dtypes,
  shapes, offsets) is written first and the tensor bytes are appended as they are computed;
- with several alphas, each input tensor is read once and every output is written in the same pass.

Everything is checked before the first byte is written, and the outputs are written into a
temporary folder beside ``out_dir`` that is renamed into place only when complete.
"""

import fnmatch
import json
import os
import shutil
import struct
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

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

_DTYPE_TO_SAFETENSORS = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
_SAFETENSORS_TO_DTYPE = {v: k for k, v in _DTYPE_TO_SAFETENSORS.items()}

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


@dataclass
class ShardPlan:
    """Output shards planned from tensor specs: file name -> ordered tensor names, and each tensor's output spec."""

    shards: dict[str, list[str]]
    specs: dict[str, Spec]

    def weight_map(self) -> dict[str, str]:
        return {name: file for file, names in self.shards.items() for name in names}

    def total_size(self) -> int:
        return sum(_nbytes(spec) for spec in self.specs.values())


def _nbytes(spec: Spec) -> int:
    shape, dtype = spec
    return int(torch.Size(shape).numel()) * dtype.itemsize


def plan_shards(specs: dict[str, Spec], shard_size: int) -> ShardPlan:
    """Fill shards greedily in the given order; a tensor larger than ``shard_size`` gets a shard of its own.

    One shard is named ``model.safetensors``; several ``model-00001-of-0000N.safetensors`` (as transformers names them).
    """
    groups: list[list[str]] = [[]]
    used = 0
    for name, spec in specs.items():
        size = _nbytes(spec)
        if groups[-1] and used + size > shard_size:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    if len(groups) == 1:
        return ShardPlan({SAFE_WEIGHTS_NAME: groups[0]}, dict(specs))
    n = len(groups)
    return ShardPlan({f"model-{i:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups, 1)}, dict(specs))


def _safetensors_header(names: list[str], specs: dict[str, Spec]) -> bytes:
    """The 8-byte little-endian length and JSON header of a safetensors file holding ``names`` in order."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        shape, dtype = specs[name]
        size = _nbytes(specs[name])
        header[name] = {"dtype": _DTYPE_TO_SAFETENSORS[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


class StreamingShardWriter:
    """Writes the tensors of a :class:`ShardPlan` into ``folder``, in the plan's order, each in one or more chunks.

    A shard's header is written when its first tensor starts and the file is closed after its
    last; an index is written at the end when there are several shards. Use
    ``start_tensor(name)``, ``write_chunk(chunk)`` (the tensor's elements in C order, in pieces),
    ``end_tensor()``, or :meth:`write` for a whole tensor.
    """

    def __init__(self, folder: Path, plan: ShardPlan):
        self.folder = folder
        self.plan = plan
        self._order = iter([(file, name) for file, names in plan.shards.items() for name in names])
        self._file = None
        self._left_in_shard = 0
        self._tensor: str | None = None
        self._bytes_left = 0

    def start_tensor(self, name: str) -> None:
        file, expected = next(self._order, (None, None))
        if name != expected or self._tensor is not None:
            raise RuntimeError(f"Out-of-plan tensor {name!r} (expected {expected!r}).")
        if self._file is None:
            self._file = open(self.folder / file, "wb")  # noqa: SIM115 (closed after the shard's last tensor)
            self._file.write(_safetensors_header(self.plan.shards[file], self.plan.specs))
            self._left_in_shard = len(self.plan.shards[file])
        self._tensor, self._bytes_left = name, _nbytes(self.plan.specs[name])

    def write_chunk(self, chunk: torch.Tensor) -> None:
        if chunk.dtype != self.plan.specs[self._tensor][1]:
            raise RuntimeError(f"Chunk of {self._tensor!r} has dtype {chunk.dtype}, planned {self.plan.specs[self._tensor][1]}.")
        data = chunk.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # raw little-endian bytes, C order
        self._bytes_left -= data.numel()
        self._file.write(data.numpy().data)

    def end_tensor(self) -> None:
        if self._bytes_left != 0:
            planned = _nbytes(self.plan.specs[self._tensor])
            raise RuntimeError(f"Tensor {self._tensor!r} got {planned - self._bytes_left} bytes, planned {planned}.")
        self._tensor = None
        self._left_in_shard -= 1
        if self._left_in_shard == 0:
            self._file.close()
            self._file = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.start_tensor(name)
        self.write_chunk(tensor)
        self.end_tensor()

    def finish(self) -> None:
        if next(self._order, None) is not None or self._file is not None:
            raise RuntimeError("The shard writer was finished before all planned tensors were written.")
        if len(self.plan.shards) > 1:
            index = {"metadata": {"total_size": self.plan.total_size()}, "weight_map": self.plan.weight_map()}
            (self.folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


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


def _parse_shard_size(shard_size: int | str) -> int:
    if isinstance(shard_size, str):
        from huggingface_hub.serialization._base import parse_size_to_int

        try:
            shard_size = parse_size_to_int(shard_size)
        except ValueError as err:
            raise ValueError(f"`shard_size` must be bytes or a size like '5GB', got {shard_size!r}.") from err
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size <= 0:
        raise ValueError(f"`shard_size` must be a positive number of bytes or a size like '5GB', got {shard_size!r}.")
    return shard_size


def _parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype not in _DTYPE_TO_SAFETENSORS:
        raise ValueError(f"`dtype` must be None or one of float32, float16, bfloat16, float64, got {dtype!r}.")
    return dtype


def _check_out_dir(out_dir: Path, overwrite: bool, inputs: list[Path]) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"`out_dir`={str(out_dir)!r} exists and is not a folder.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"`out_dir`={str(out_dir)!r} is not empty; pass overwrite=True to replace it.")
    resolved = out_dir.resolve()
    for folder in inputs:
        folder = folder.resolve()
        if resolved == folder or resolved.is_relative_to(folder) or folder.is_relative_to(resolved):
            raise ValueError(f"`out_dir`={str(out_dir)!r} overlaps the input folder {str(folder)!r}.")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished ``tmp`` to ``out_dir``, replacing what was there (empty, or overwrite=True)."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out_dir)


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
    """Write theta = theta_base + alpha * (theta_tuned - theta_base) for two checkpoints, streamed tensor by tensor.

    Paper: https://arxiv.org/abs/2211.12092. Floating tensors are interpolated in float32 and cast
    back (``alpha = 0`` and ``alpha = 1`` reproduce the inputs bit for bit); integer and boolean
    tensors are copied from ``tuned``. Checkpoints cannot tell buffers from parameters, so every
    saved floating tensor is interpolated. Both inputs must hold the same tensors: use
    :func:`~hf_ext.merging.interpolate_models` for models with a head only one of them has.

    Each output folder gets sharded safetensors (with ``model.safetensors.index.json`` when there
    are several shards), ``tuned``'s config, generation config, tokenizer files and remote code, and
    a model card recording base, tuned and alpha.

    Args:
        base: the pre-trained model: a local folder or a Hub repo id (fetched with
            ``huggingface_hub.snapshot_download``; ``.bin`` weights load with ``weights_only=True``).
        tuned: the fine-tuned model, same architecture and tensors as ``base``.
        alpha: one coefficient, or a sequence of them; each input tensor is then read once and
            every output written in the same pass.
        out_dir: the output model folder for one alpha; for a sequence, the folder that gets one
            sub-folder per alpha (``alpha_0.5``, ``alpha_-1``, see :func:`alpha_folder_name`).
        shard_size: the largest output shard, in bytes or as a string like ``"5GB"``; a tensor
            larger than that gets a shard of its own.
        dtype: cast floating tensors to this dtype on output (and record it in config.json);
            None keeps each tensor's dtype.
        overwrite: replace a non-empty ``out_dir`` (it is only replaced once the new one is complete).
        cache_dir: the Hub cache for repo ids (default: huggingface_hub's).
        progress: show a tqdm progress bar over the bytes read.

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
    shard_size = _parse_shard_size(shard_size)
    dtype = _parse_dtype(dtype)
    out_dir = Path(out_dir).expanduser()
    _check_out_dir(out_dir, overwrite, [])  # fail fast, before any download
    base_folder = resolve_model_folder(base, "base", cache_dir)
    tuned_folder = resolve_model_folder(tuned, "tuned", cache_dir)
    _check_out_dir(out_dir, overwrite, [base_folder, tuned_folder])
    base_ckpt, tuned_ckpt = Checkpoint(base_folder, "base"), Checkpoint(tuned_folder, "tuned")
    check_same_architecture(base_ckpt, tuned_ckpt)
    check_tensor_specs(base_ckpt.specs(), tuned_ckpt.specs())

    # 2. Plan the output shards from the headers (the same plan for every alpha).
    out_specs = {
        name: (shape, dtype if dtype is not None and spec_dtype.is_floating_point else spec_dtype)
        for name, (shape, spec_dtype) in base_ckpt.specs().items()
    }
    plan = plan_shards(out_specs, shard_size)

    # 3. Stream into a temporary folder beside out_dir; rename it into place when complete.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    folders = [tmp / alpha_folder_name(a) for a in alphas] if several else [tmp]
    writers = []
    try:
        for folder in folders:
            folder.mkdir(exist_ok=True)
            writers.append(StreamingShardWriter(folder, plan))
        _stream(base_ckpt, tuned_ckpt, alphas, writers, out_specs, progress)
        for folder, a in zip(folders, alphas):
            _copy_tuned_files(tuned_folder, folder, dtype)
            save_model_card(folder, "interpolation", base_model=str(base), tuned_model=str(tuned), alpha=a)
        _move_into_place(tmp, out_dir)
    except BaseException:  # interrupted or failed: leave nothing half-written behind
        for writer in writers:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if several:
        return [out_dir / alpha_folder_name(a) for a in alphas]
    return out_dir


def _stream(
    base: Checkpoint,
    tuned: Checkpoint,
    alphas: list[float],
    writers: list[StreamingShardWriter],
    out_specs: dict[str, Spec],
    progress: bool,
) -> None:
    """Read each tensor pair once, in base's order, and write it interpolated for every alpha, chunk by chunk.

    Chunks bound the float32 temporaries of :func:`lerp` (a few times ``_CHUNK_ELEMENTS`` * 4 bytes)
    whatever the tensor size.
    """
    from tqdm.auto import tqdm

    total = 2 * sum(_nbytes(spec) for spec in base.specs().values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="interpolating", disable=not progress) as bar:
        for name, (_, spec) in base.tensors.items():
            theta_base, theta_tuned = base.get(name).reshape(-1), tuned.get(name).reshape(-1)  # (N,) views of the maps
            out_dtype = out_specs[name][1]
            for writer in writers:
                writer.start_tensor(name)
            for i in range(0, theta_tuned.numel(), _CHUNK_ELEMENTS):
                chunk_base, chunk_tuned = theta_base[i : i + _CHUNK_ELEMENTS], theta_tuned[i : i + _CHUNK_ELEMENTS]
                for alpha, writer in zip(alphas, writers):
                    if chunk_tuned.is_floating_point():
                        writer.write_chunk(lerp(chunk_base, chunk_tuned, alpha, dtype=out_dtype))
                    else:  # integer and boolean tensors come from tuned
                        writer.write_chunk(chunk_tuned)
            for writer in writers:
                writer.end_tensor()
            bar.update(2 * _nbytes(spec))
            del theta_base, theta_tuned  # unmaps their pages
    for writer in writers:
        writer.finish()


__all__ = [
    "Checkpoint",
    "ShardPlan",
    "StreamingShardWriter",
    "alpha_folder_name",
    "check_same_architecture",
    "interpolate_checkpoints",
    "plan_shards",
    "resolve_model_folder",
]
