"""Model cards for what hf_ext saves or pushes itself.

Each such method has a template in the repository's top-level ``model_cards/<method>.md`` (shipped in the
wheel as ``hf_ext/model_cards/``): a YAML header with the method's static metadata (``library_name``,
``arxiv``, ``pipeline_tag``, ``license``, ``tags``) and a Jinja body. :func:`render_model_card` merges
that header with what the caller knows (base model, extra fields) into ``huggingface_hub.ModelCardData``
and renders the card. TR-DPO and AoT P-Tuning have no template: their artefacts carry the card their
library writes (TRL's trainer card, PEFT's adapter card), tagged by hf_ext.
"""

import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from huggingface_hub import ModelCard, ModelCardData

from hf_ext.atomic import atomic_file

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable  # Python >= 3.11; importlib.abc's before

_HEADER_FIELDS = {"library_name", "arxiv", "pipeline_tag", "license", "tags", "paper"}


def _templates() -> "Traversable":
    """The installed package's ``hf_ext/model_cards/`` (pyproject.toml maps ``model_cards/`` there), else a checkout's."""
    shipped = resources.files("hf_ext") / "model_cards"
    return shipped if shipped.is_dir() else Path(__file__).resolve().parents[1] / "model_cards"


def available_templates() -> list[str]:
    """Names of the methods that have a model card template."""
    return sorted(p.name[:-3] for p in _templates().iterdir() if p.name.endswith(".md"))


def _read_template(method: str) -> tuple[dict, str]:
    path = _templates() / f"{method}.md"
    if not path.is_file():
        raise ValueError(f"No model card template for `method`={method!r}; available: {available_templates()}.")
    text = path.read_text(encoding="utf-8")
    _, header, body = text.split("---\n", 2)
    meta = yaml.safe_load(header)
    unknown = set(meta) - _HEADER_FIELDS
    if unknown:
        raise ValueError(f"Template {method}.md has unknown header fields {sorted(unknown)}; allowed: {sorted(_HEADER_FIELDS)}.")
    return meta, body


def render_model_card(
    method: str,
    *,
    base_model: str | list[str] | None = None,
    extra_tags: tuple[str, ...] = (),
    model_name: str = "model",
    **template_kwargs,
) -> ModelCard:
    """Render the model card of ``method``.

    Args:
        method: a template name (see :func:`available_templates`).
        base_model: the Hub id(s) the model was built from, when known.
        extra_tags: tags added after the method's own.
        model_name: the card's title.
        template_kwargs: values for the template body (e.g. ``alpha`` for interpolation).

    Returns:
        A ``huggingface_hub.ModelCard`` whose metadata carries ``library_name``, the tags
        ``hf-ext``, the method and ``arxiv:<id>``, ``base_model`` when given, ``pipeline_tag`` and
        ``license``.
    """
    meta, body = _read_template(method)
    tags = ["hf-ext", method, f"arxiv:{meta['arxiv']}", *meta.get("tags", []), *extra_tags]
    card_data = ModelCardData(
        library_name=meta["library_name"],
        license=meta.get("license", "apache-2.0"),
        pipeline_tag=meta.get("pipeline_tag"),
        base_model=base_model,
        tags=list(dict.fromkeys(tags)),
    )
    template = "---\n{{ card_data }}\n---\n" + body
    return ModelCard.from_template(
        card_data, template_str=template, model_name=model_name, arxiv=meta["arxiv"], paper=meta.get("paper", ""),
        base_model=base_model, **template_kwargs,
    )


def save_model_card(folder: str | os.PathLike, method: str, **kwargs) -> Path:
    """Render the card of ``method`` (see :func:`render_model_card`) into ``folder/README.md``.

    The file is written beside its final place and renamed into it, so a reader never sees half a card.
    """
    card = render_model_card(method, **kwargs)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / "README.md") as tmp:
        tmp.write_text(str(card), encoding="utf-8")
    return folder / "README.md"


__all__ = ["available_templates", "render_model_card", "save_model_card"]
