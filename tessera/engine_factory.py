"""Build the engine a config asks for: in this process, or disaggregated over workers."""

from __future__ import annotations

from tessera.config import EngineConfig
from tessera.engine.llm_engine import LLMEngine
from tessera.engine.protocol import Engine


def create_engine(config: EngineConfig) -> Engine:
    """``LLMEngine`` unless ``config.afd`` asks for attention/FFN disaggregation or
    ``config.cluster`` for several instances behind a router."""
    if config.cluster is not None:
        from tessera.cluster.front import ClusterEngine  # spawns processes

        return ClusterEngine(config)
    if config.afd is None:
        return LLMEngine(config)
    from tessera.afd.front import AFDEngine  # spawns processes; only imported when used

    return AFDEngine(config)
