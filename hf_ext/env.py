"""`hf-ext env`: the versions that matter for a bug report, and the device."""

import argparse
import importlib.metadata
import platform

_PACKAGES = ["hf-ext", "torch", "transformers", "trl", "peft", "diffusers", "accelerate", "datasets",
             "huggingface_hub", "safetensors", "scipy", "fla-core", "triton"]


def _installed_version(distribution: str) -> str:
    """The installed version of ``distribution``, or ``"not installed"``."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect_env() -> dict[str, str]:
    """Python, platform, package versions ("not installed" where missing) and the torch build and device.

    torch is reported as the running build says (``torch.__version__``, e.g. ``2.14.1+cu130``), with its CUDA
    version: a wheel's distribution version may leave out the build (PyPI's CUDA wheels are ``2.14.1``).
    """
    import torch

    torch_build = f"{torch.__version__} (CUDA {torch.version.cuda})" if torch.version.cuda else torch.__version__
    info = {"python": platform.python_version(), "platform": platform.platform()}
    for name in _PACKAGES:
        info[name] = torch_build if name == "torch" else _installed_version(name)

    if torch.cuda.is_available():
        info["device"] = f"cuda ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} device(s))"
    else:
        info["device"] = f"cpu ({torch.get_num_threads()} threads)"
    return info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> int:
    for key, value in collect_env().items():
        print(f"- {key}: {value}")
    return 0


__all__ = ["collect_env"]
