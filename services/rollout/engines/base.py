"""The interface every rollout engine implements (torch reference engine, LMDeploy engine)."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from shared.contracts.wire import GenerationRequest, Rollout

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from shared.model.sdar import DiffusionSpec


class GenerationCancelled(Exception):
    """``Engine.generate`` stopped because its caller set the ``cancel`` event; nothing is returned."""


class Engine(ABC):
    """Generates rollouts with step maps and swaps weights between policy versions.

    Contract (docs/design.md section 2): blocks aligned to absolute positions from the first prompt token, the
    step map 1-based and global over the response, the last block's tail recorded, per-request seeds
    (same seed, same output, whatever the batch).
    """

    name: str = "engine"

    supports_block_hook: bool = False
    """Whether the engine calls `block_hook` between blocks (`rollout.swap_at_block`): an engine whose scheduler
    owns the batch across steps (LMDeploy) cannot run a weights load between two blocks of a running batch."""

    block_hook: Callable[[], None] | None = None
    """Called on the generating thread at every block boundary after a row's first block, while the caller
    (`EngineHost`) holds the engine: it may call `load_weights`, and the in-flight rows go on with the new weights."""

    @property
    @abstractmethod
    def spec(self) -> DiffusionSpec:
        """Block size and mask token id of the loaded model."""

    @property
    @abstractmethod
    def policy_version(self) -> int:
        """Version of the weights that produced the next rollouts."""

    @property
    @abstractmethod
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The served model's tokenizer (prompt text -> ids, response ids -> text)."""

    @abstractmethod
    def generate(
        self, requests: Sequence[GenerationRequest], *, cancel: threading.Event | None = None
    ) -> list[list[Rollout]]:
        """Decode every request; returns ``params.n`` rollouts per request, in request order.

        Raises:
            ValueError: a request this model or engine cannot serve (the message names the field).
            GenerationCancelled: ``cancel`` was set; the engine stopped at its next block boundary.
        """

    @abstractmethod
    def load_weights(self, path: str | Path, version: int) -> None:
        """Replace the weights with an SDAR-layout checkpoint directory; later rollouts carry ``version``."""

    def close(self) -> None:  # noqa: B027 - engines without resources need not override
        """Release devices and processes."""
