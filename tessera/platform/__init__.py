"""Device platforms. Everything device-specific goes through ``Platform`` so another backend
(an NPU, say) plugs in by adding one class, without touching model or engine code."""

from tessera.platform.base import Platform, get_platform

__all__ = ["Platform", "get_platform"]
