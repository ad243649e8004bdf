"""Backbone adapters, one per model family; `get_adapter(family)` is the only entry point."""

from .base import BackboneAdapter


def _registry() -> dict[str, type[BackboneAdapter]]:
    from .llava_onevision import LlavaOnevisionAdapter
    from .qwen_vl import Qwen2_5_VLAdapter, Qwen3_VLAdapter

    return {a.family: a for a in (Qwen2_5_VLAdapter, Qwen3_VLAdapter, LlavaOnevisionAdapter)}


FAMILIES = ("qwen2_5_vl", "qwen3_vl", "llava_onevision")


def get_adapter(family: str) -> BackboneAdapter:
    registry = _registry()
    if family not in registry:
        raise ValueError(f"unknown model.family {family!r}; choose one of {sorted(registry)}")
    return registry[family]()
