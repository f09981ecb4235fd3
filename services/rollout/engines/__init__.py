"""Rollout engines behind one interface (:class:`Engine`), built by name with :func:`create_engine`.

Layering: ``base`` (the interface) <- ``sampling`` and ``rows`` (shared maths and row handling) <- the engines
(``torch_engine``, ``naive``, ``lmdeploy_engine``) <- this factory. The engines are imported only when built, and
LMDeploy only when asked for (a GPU-only extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.rollout.engines.base import Engine, GenerationCancelled

ENGINES = ("torch", "lmdeploy")


def create_engine(kind: str, model_path: str | Path, **options: Any) -> Engine:
    """Build an engine by name (``torch`` or ``lmdeploy``); ``options`` go to its ``from_pretrained``.

    Raises:
        ValueError: an unknown engine name.
        LMDeployNotInstalledError: ``lmdeploy`` without LMDeploy installed (an ImportError naming the extra).
    """
    if kind == "torch":
        from services.rollout.engines.torch_engine import TorchEngine

        return TorchEngine.from_pretrained(model_path, **options)
    if kind == "lmdeploy":
        from services.rollout.engines.lmdeploy_engine import LMDeployEngine

        return LMDeployEngine.from_pretrained(model_path, **options)
    raise ValueError(f"engine: unknown engine {kind!r}; allowed: {', '.join(repr(e) for e in ENGINES)}")


__all__ = ["ENGINES", "Engine", "GenerationCancelled", "create_engine"]
