"""The variant registry. Adding a variant: one new file in this folder and one line here."""

from __future__ import annotations

from lorafam.adapters.base import AdapterConfig, AdapterLayer, Variant
from lorafam.adapters.lora import LoRA

VARIANTS: dict[str, type[Variant]] = {
    cls.name: cls
    for cls in [
        LoRA,
    ]
}


def build_variant(config: AdapterConfig) -> Variant:
    """The variant instance for a validated ``adapter:`` config."""
    return VARIANTS[config.variant](config)


__all__ = ["VARIANTS", "AdapterConfig", "AdapterLayer", "Variant", "build_variant"]
