"""The interface every rollout engine implements (torch reference engine, LMDeploy engine)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from shared.contracts import GenerationRequest, Rollout

if TYPE_CHECKING:
    from shared.model import DiffusionSpec


class Engine(ABC):
    """Generates rollouts with step maps and swaps weights between policy versions.

    Contract (design.md section 2): blocks aligned to absolute positions from the first prompt token, the
    step map 1-based and global over the response, the last block's tail recorded, per-request seeds
    (same seed, same output, whatever the batch).
    """

    name: str = "engine"

    @property
    @abstractmethod
    def spec(self) -> DiffusionSpec:
        """Block size and mask token id of the loaded model."""

    @property
    @abstractmethod
    def policy_version(self) -> int:
        """Version of the weights that produced the next rollouts."""

    @abstractmethod
    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Rollout]]:
        """Decode every request; returns ``params.n`` rollouts per request, in request order."""

    @abstractmethod
    def load_weights(self, path: str | Path, version: int) -> None:
        """Replace the weights with an SDAR-layout checkpoint directory; later rollouts carry ``version``."""

    def close(self) -> None:  # noqa: B027 - engines without resources need not override
        """Release devices and processes."""


def create_engine(kind: str, model_path: str | Path, **options: object) -> Engine:
    """Build an engine by name. LMDeploy is imported only when asked for (GPU-only extra)."""
    if kind == "torch":
        from services.rollout.engines.torch_engine import TorchEngine

        return TorchEngine.from_pretrained(model_path, **options)  # type: ignore[arg-type]
    if kind == "lmdeploy":
        try:
            from services.rollout.engines.lmdeploy_engine import LMDeployEngine  # type: ignore[import-not-found]
        except ImportError as e:
            raise ValueError(
                f"engine: 'lmdeploy' needs the GPU extra (pip install 'gtpo[lmdeploy]') and its engine module: {e}"
            ) from e
        return LMDeployEngine.from_pretrained(model_path, **options)
    raise ValueError(f"engine: unknown engine {kind!r}; allowed: 'torch', 'lmdeploy'")
