"""The variant registry. Adding a variant: one new file in this folder and one line here."""

from __future__ import annotations

from lorafam.adapters.base import AdapterConfig, AdapterLayer, Variant
from lorafam.adapters.lora import LoRA
from lorafam.adapters.lora_fa import LoRAFA
from lorafam.adapters.lora_plus import LoRAPlus
from lorafam.adapters.vera import VeRA
from lorafam.adapters.dora import DoRA
from lorafam.adapters.delta_lora import DeltaLoRA
from lorafam.adapters.glora import GLoRA
from lorafam.adapters.adalora import AdaLoRA
from lorafam.adapters.lora_drop import LoRADrop

VARIANTS: dict[str, type[Variant]] = {
    cls.name: cls
    for cls in [
        LoRA,
        LoRAPlus,
        LoRAFA,
        VeRA,
        DoRA,
        DeltaLoRA,
        GLoRA,
        AdaLoRA,
        LoRADrop,
    ]
}


def build_variant(config: AdapterConfig) -> Variant:
    """The variant instance for a validated ``adapter:`` config."""
    return VARIANTS[config.variant](config)


__all__ = ["VARIANTS", "AdapterConfig", "AdapterLayer", "Variant", "build_variant"]
