"""The `lmdeploy` rollout engine: LMDeploy's dLLM PyTorch engine (GPU nodes) behind the `Engine` interface.

Rollouts carry the same contract as the torch engine's (docs/design.md section 2): step maps come from our
runtime patch of LMDeploy's scheduler (`lmdeploy_patch`), the response is cut at the first stop token by us,
and the rest of the last block is the tail.

How LMDeploy is driven:

* One in-process `AsyncEngine(backend="pytorch")` on a private event-loop thread; requests are sent as
  token ids (`preprocess(input_ids=...)` then `generate`). The scheduler must live in this process, so
  multi-process engines, data parallelism, PD disaggregation and prefix caching are refused
  (`lmdeploy_patch.check_engine_config`); tensor parallelism is fine (only model workers move out).
* The dLLM settings (block length, unmasking strategy, threshold, denoising steps) are engine-wide in
  LMDeploy, and it mis-assigns per-sequence sampling settings within a batch, so requests are grouped by
  (dLLM settings, temperature, top-k, top-p) and the groups run one after another; a group with other dLLM
  settings than the running engine rebuilds it. `dllm_block_length` is always passed explicitly.
* `n` samples are n repeated requests, each with its own seed (`derive_seed`, as the torch engine). LMDeploy
  samples on the GPU with its own generator: a seed does not reproduce a rollout across batches.
* Weights: `load_weights` loads version N from a checkpoint directory in place (LMDeploy's own weight loader
  into the running model, same node, no serialisation) when the architecture is unchanged and the model
  runs in this process; otherwise it rebuilds the engine.
* Behaviour log-probs (``logprobs=True``) are offered at any temperature with top-k 0 and top-p 1: there the
  recorder's value is log p(token) under the policy that sampled it, the shared transform's
  (``shared.model.sampling``, see `lmdeploy_patch` and `check_logprob_settings`); a top-k or top-p is refused, naming it.
  LMDeploy's own dLLM log-probs are not used (they are known to be wrong).
* Cancellation: the ``cancel`` event is polled every ``CANCEL_POLL_S`` while LMDeploy decodes; when set, the
  request tasks are cancelled (LMDeploy ends their sessions) and ``GenerationCancelled`` is raised.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from services.rollout.engines import lmdeploy_patch as patch
from services.rollout.engines.base import Engine
from services.rollout.engines.rows import (
    Row,
    build_rollout,
    check_spec,
    decode_grouped,
    default_stop_ids,
    expand_rows,
    raise_if_cancelled,
)
from services.rollout.settings import LMDeployOptions
from shared.contracts.wire import MIN_TEMPERATURE, GenerationRequest, Rollout, SamplingParams, Strategy
from shared.model.adapter import is_adapter_dir
from shared.model.sdar import DiffusionSpec, load_tokenizer, nonfinite_in_files, read_config, translate_config

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = SamplingParams.model_fields["confidence_threshold"].default
MAX_TEMPERATURE = 2.0
"""LMDeploy's GenerationConfig accepts temperatures in [0, 2]."""
CANCEL_POLL_S = 0.05
"""How often a running generate looks at its ``cancel`` event."""
ARCH_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
    "max_position_embeddings",
    "rope_theta",
    "rope_scaling",
    "block_size",
    "mask_token_id",
    "model_type",
)
"""config.json keys that must not change for an in-place weight load."""


def check_logprob_settings(p: SamplingParams) -> None:
    """Refuse, naming the setting, a request whose recorded log-probs would not be exact under the shared transform.

    The recorder takes log softmax(logits)[token] of the logits LMDeploy hands ``post_sampling``: its logits
    processors have divided them by the temperature (the unmasking confidence is p under softmax(logits / T), as in
    the torch engine), but top-k and top-p are applied later, inside its sampler. So any temperature is exact
    (``shared.model.sampling.sampling_log_probs`` at (T, 0, 1)); a top-k or top-p would be recorded as if unfiltered, and
    LMDeploy's own filters differ from the shared transform at the boundary anyway (top-k keeps exactly k by rank,
    top-p drops where the mass before exceeds p, strictly).
    """
    off = {"top_k": 0, "top_p": 1.0}
    for name, value in (("top_k", p.top_k), ("top_p", p.top_p)):
        if value != off[name]:
            raise ValueError(
                f"{name}: the 'lmdeploy' engine records behaviour log-probs before its {name} filter, so they are "
                f"exact only at {name}={off[name]} (any temperature is fine), got {name}={value}; use engine "
                f"'torch' for log-probs under {name} (logprobs=True)"
            )
    if p.temperature < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature: greedy decoding (temperature={p.temperature}) has no behaviour log-probs (logprobs=True)"
        )


@dataclass(frozen=True)
class DllmSettings:
    """LMDeploy's engine-wide dLLM settings (`PytorchEngineConfig.dllm_*`)."""

    block_size: int
    strategy: str
    threshold: float
    denoising_steps: int


def _paging_block(block_size: int, default: int) -> int:
    """LMDeploy's KV page size for a dLLM block length: a multiple of it, a power of two >= 16."""
    if default % block_size == 0:
        return default
    if block_size >= 16 and block_size & (block_size - 1) == 0:
        return block_size
    raise ValueError(f"block_size: LMDeploy needs a divisor of {default} or a power of two >= 16, got {block_size}")


def backend_config(settings: DllmSettings, opts: LMDeployOptions):
    """The `PytorchEngineConfig` for one dLLM setting; refuses what would hide the scheduler from us."""
    from lmdeploy import PytorchEngineConfig

    paging = _paging_block(settings.block_size, opts.paging_block_size)
    cfg = PytorchEngineConfig(
        dtype=opts.dtype,
        tp=opts.tp,
        session_len=opts.session_len,
        max_batch_size=opts.max_batch_size,
        cache_max_entry_count=opts.cache_max_entry_count,
        num_gpu_blocks=opts.num_gpu_blocks,
        block_size=paging,
        eager_mode=opts.eager_mode,
        enable_prefix_caching=False,
        enable_mp_engine=False,
        enable_metrics=opts.enable_metrics,
        dllm_block_length=settings.block_size,
        dllm_unmasking_strategy=settings.strategy,
        dllm_denoising_steps=settings.denoising_steps,
        dllm_confidence_threshold=settings.threshold,
    )
    patch.check_engine_config(cfg)
    return cfg


def build_async_engine(model_path: str, cfg: Any) -> Any:
    """A real LMDeploy `AsyncEngine` (needs CUDA). Tests replace this function with a CPU stand-in."""
    import torch
    from lmdeploy.serve.core.async_engine import AsyncEngine

    if not torch.cuda.is_available():
        raise RuntimeError("the 'lmdeploy' engine needs a CUDA GPU; use engine 'torch' on CPU")
    return AsyncEngine(model_path, backend="pytorch", backend_config=cfg)


class _LoopThread:
    """A private asyncio loop in a daemon thread: LMDeploy's engine loop and our requests run on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="lmdeploy-loop", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, *args):
        """Run a plain function on the loop thread (LMDeploy objects are not thread-safe)."""

        async def _call():
            return fn(*args)

        return self.run(_call())

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        if not self.thread.is_alive():
            self.loop.close()


async def _gather_or_cancel(coros, cancel: threading.Event | None = None):
    """Like `asyncio.gather`, but a failure, or ``cancel`` set (GenerationCancelled), cancels the rest and waits for
    them to unwind (no orphan requests left decoding)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        gathered = asyncio.gather(*tasks)
        while True:
            done, _ = await asyncio.wait({gathered}, timeout=CANCEL_POLL_S)
            if done:
                return gathered.result()
            raise_if_cancelled(cancel)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class LMDeployEngine(Engine):
    """Rollouts from LMDeploy's dLLM engine, with step maps recorded by our scheduler patch."""

    name = "lmdeploy"

    def __init__(
        self,
        model_path: str | Path,
        *,
        options: LMDeployOptions | None = None,
        policy_version: int = 0,
        default_settings: DllmSettings | None = None,
    ) -> None:
        self._opts = options or LMDeployOptions()
        if self._opts.max_batch_size < 1:
            raise ValueError(f"max_batch_size: must be >= 1, got {self._opts.max_batch_size}")
        self._info = patch.apply_patch(allow_untested=self._opts.allow_untested_lmdeploy)
        self._path = Path(model_path)
        self._raw = read_config(self._path)
        self._tokenizer = load_tokenizer(self._path)
        _, self._spec = translate_config(self._raw, self._tokenizer)
        self._stop_ids = default_stop_ids(self._tokenizer)
        self._version = policy_version
        self._loop = _LoopThread()
        self._ae: Any = None
        self._settings: DllmSettings | None = None
        try:
            self._build(default_settings or self._resolve_settings(GenerationRequest(prompt_ids=[0]).params))
        except BaseException:
            self._loop.close()
            raise

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str = "auto",
        max_batch_size: int = 32,
        policy_version: int = 0,
        **options: Any,
    ) -> LMDeployEngine:
        """Serve an SDAR-layout checkpoint with LMDeploy. `options`: fields of :class:`LMDeployOptions` (the rollout
        service's `lmdeploy` section).

        Raises:
            LMDeployNotInstalledError: LMDeploy is missing (names the extra to install).
            RuntimeError: untested LMDeploy version or changed internals, no CUDA.
            ValueError: a device other than CUDA, or engine settings the recorder cannot support.
        """
        patch.import_lmdeploy()
        if device not in ("auto", "cuda") and not device.startswith("cuda:"):
            raise ValueError(f"device: the 'lmdeploy' engine runs on CUDA only, got {device!r}; use engine 'torch'")
        if device.startswith("cuda:"):
            log.warning("lmdeploy uses the current CUDA device; select %s with CUDA_VISIBLE_DEVICES", device)
        unknown = set(options) - set(LMDeployOptions.model_fields)
        if unknown:
            raise ValueError(f"lmdeploy engine: unknown options {sorted(unknown)}")
        opts = LMDeployOptions(max_batch_size=max_batch_size, **options)
        return cls(path, options=opts, policy_version=policy_version)

    # ------------------------------------------------------------------ Engine interface

    @property
    def spec(self) -> DiffusionSpec:
        return self._spec

    @property
    def policy_version(self) -> int:
        return self._version

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def settings(self) -> DllmSettings | None:
        """The dLLM settings of the running LMDeploy engine."""
        return self._settings

    def generate(
        self, requests: Sequence[GenerationRequest], *, cancel: threading.Event | None = None
    ) -> list[list[Rollout]]:
        """Rows are grouped by (dLLM settings, temperature, top-k, top-p) and the groups run one after another."""
        rows = expand_rows(requests, self._spec.block_size, self._stop_ids, self._vocab)
        for row in rows:
            self._check_row(row)

        def key(row: Row) -> Hashable:
            p = row.params
            return (self._resolve_settings(p), p.temperature, p.top_k, p.top_p)

        def decode(k: Hashable, group: list[Row]) -> list[Rollout]:
            assert isinstance(k, tuple)
            raise_if_cancelled(cancel)
            if k[0] != self._settings:
                log.warning("lmdeploy: rebuilding the engine for %s (was %s)", k[0], self._settings)
                self._rebuild(k[0])
            return self._loop.run(_gather_or_cancel([self._generate_row(row) for row in group], cancel))

        return decode_grouped(requests, rows, key, decode)

    def load_weights(self, path: str | Path, version: int) -> None:
        path = Path(path)
        if is_adapter_dir(path):
            # LMDeploy builds its adapters with the engine and has no in-place update for them (docs/lmdeploy.md)
            raise ValueError(
                f"{path} is a LoRA adapter version; the lmdeploy engine serves merged weights only: train with "
                "lora.publish=merged"
            )
        raw = read_config(path)
        tokenizer = load_tokenizer(path)
        _, spec = translate_config(raw, tokenizer)
        check_spec(path, spec, self._spec)
        if not any(path.glob("*.safetensors")):
            raise FileNotFoundError(f"no safetensors weights in {path}")
        # one read of the files (the trainer just wrote them: page cache) against an engine that would answer
        # every generate with an error until the next version
        if (bad := nonfinite_in_files(sorted(path.glob("*.safetensors")))) is not None:
            raise ValueError(f"{path}: tensor {bad} holds NaN or inf values")
        same_arch = all(raw.get(k) == self._raw.get(k) for k in ARCH_KEYS)
        if same_arch and self._reload_in_place(path):
            log.info("lmdeploy: loaded v%d from %s in place", version, path)
        else:
            log.info("lmdeploy: rebuilding the engine for v%d from %s", version, path)
            self._path, self._raw, self._tokenizer = path, raw, tokenizer
            self._rebuild(self._settings)
        self._path, self._version = path, version

    def close(self) -> None:
        self._shutdown_engine()
        self._loop.close()

    # ------------------------------------------------------------------ internals

    def _resolve_settings(self, params) -> DllmSettings:
        """The engine-wide settings a request needs; what its strategy ignores is normalised (no needless rebuild)."""
        p = params if params.block_size is not None else params.resolved(self._spec.block_size, self._stop_ids)
        b = p.block_size
        dynamic = p.strategy == Strategy.low_confidence_dynamic
        return DllmSettings(
            block_size=b,
            strategy=p.strategy.value,
            threshold=float(p.confidence_threshold) if dynamic else DEFAULT_THRESHOLD,
            denoising_steps=b if dynamic else (p.denoising_steps or b),
        )

    @property
    def _vocab(self) -> int:
        return int(self._raw["vocab_size"])

    def _check_row(self, row: Row) -> None:
        p = row.params
        if p.logprobs:
            check_logprob_settings(p)
        if p.logprobs and self._opts.tp != 1:
            raise ValueError(
                f"logprobs: the 'lmdeploy' engine records log-probs in its model agent, which runs in this process "
                f"only at tp=1 (this engine runs tp={self._opts.tp})"
            )
        if p.temperature > MAX_TEMPERATURE:
            raise ValueError(
                f"temperature: the 'lmdeploy' engine accepts at most {MAX_TEMPERATURE}, got {p.temperature}"
            )
        session_len = getattr(self._ae, "session_len", None)
        need = len(row.prompt) + p.max_new_tokens + 2 * p.block_size
        if session_len is not None and need > session_len:
            raise ValueError(
                f"max_new_tokens: prompt ({len(row.prompt)}) + max_new_tokens ({p.max_new_tokens}) + two blocks "
                f"exceed LMDeploy's session_len {session_len}"
            )

    def _build(self, settings: DllmSettings) -> None:
        cfg = backend_config(settings, self._opts)
        ae = build_async_engine(str(self._path), cfg)
        patch.check_engine_config(getattr(ae, "backend_config", cfg))
        model_config = getattr(getattr(ae, "engine", None), "model_config", None)
        mask = getattr(model_config, "dllm_mask_token", None)
        if mask is not None and int(mask) != self._spec.mask_token_id:
            self._loop.call(ae.close)
            raise RuntimeError(f"LMDeploy uses mask id {mask}, the checkpoint says {self._spec.mask_token_id}")
        ae.start_loop(self._loop.loop, use_async_api=False)
        self._ae, self._settings = ae, settings

    def _shutdown_engine(self) -> None:
        ae, self._ae = self._ae, None
        if ae is None:
            return
        try:
            self._loop.call(ae.close)
            self._loop.run(asyncio.sleep(0.05))  # let cancelled engine tasks unwind
        except Exception:  # a broken engine must not block a rebuild
            log.exception("lmdeploy: closing the engine failed")
        del ae
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a core dependency
            pass

    def _rebuild(self, settings: DllmSettings | None) -> None:
        self._shutdown_engine()
        self._build(settings or self._resolve_settings(GenerationRequest(prompt_ids=[0]).params))

    def _reload_in_place(self, path: Path) -> bool:
        """Load new weights into the running model with LMDeploy's own loader; False when not possible."""
        agent = getattr(getattr(getattr(self._ae, "engine", None), "executor", None), "model_agent", None)
        model = getattr(agent, "patched_model", None)
        if agent is None or model is None or not hasattr(agent, "all_context"):
            return False  # model workers in other processes (tp > 1) or a stand-in engine

        def _load() -> None:
            import torch
            from lmdeploy.pytorch.weight_loader.model_weight_loader import load_model_weights

            # the agent holds a graph runner (eager mode too); its inner model owns `load_weights`
            target = model.get_model() if hasattr(model, "get_model") else model
            with agent.all_context():
                load_model_weights(target, str(path), device=agent.device)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if hasattr(agent, "reset_graph_runner"):  # as LMDeploy's own weight update: no graph keeps old pointers
                agent.reset_graph_runner()

        self._loop.call(_load)
        return True

    def _stop_ids_for_lmdeploy(self, p: SamplingParams) -> list[int]:
        """The stop ids LMDeploy can see: ids outside the vocabulary are never sampled (and may not fit int64)."""
        return [t for t in p.stop_token_ids or [] if t < self._vocab]

    def _gen_config(self, row: Row):
        from lmdeploy import GenerationConfig

        p = row.params
        greedy = p.temperature <= 0
        return GenerationConfig(
            n=1,
            max_new_tokens=p.max_new_tokens,
            do_sample=not greedy,
            temperature=1.0 if greedy else p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            random_seed=row.seed,
            stop_token_ids=self._stop_ids_for_lmdeploy(p) or None,
        )

    async def _generate_row(self, row: Row) -> Rollout:
        ae, p = self._ae, row.params
        session = ae.session_mgr.get()
        req = await ae.preprocess(None, session, gen_config=self._gen_config(row), input_ids=list(row.prompt))
        # LMDeploy adds the tokenizer's and generation_config's eos ids; the contract's stop ids are exact
        req.gen_config.stop_token_ids = self._stop_ids_for_lmdeploy(p)
        req.gen_config.ignore_eos = False
        sid = req.session.session_id
        returned: list[int] = []
        reason = None
        try:
            async for out in ae.generate(req, stream_response=False):
                returned += list(out.token_ids or [])
                reason = out.finish_reason or reason
        finally:
            record = patch.pop_record(sid)
        if record is None:
            raise RuntimeError(f"LMDeploy ended session {sid} ({reason}) without a step-map record")
        if reason not in ("stop", "length"):
            raise RuntimeError(f"LMDeploy ended session {sid} with finish_reason {reason!r}")
        if record.token_ids[: len(returned)] != returned:
            raise RuntimeError(f"session {sid}: LMDeploy's output is not a prefix of the recorded trajectory")
        traj = patch.finalize(
            record,
            prompt_len=len(row.prompt),
            block_size=p.block_size,
            max_new_tokens=p.max_new_tokens,
            stop_token_ids=p.stop_token_ids or [],
        )
        if p.logprobs and not all(math.isfinite(x) for x in traj.logprobs):
            raise RuntimeError(f"session {sid}: LMDeploy reported no log-prob for some response tokens")
        filled = replace(
            row,
            tokens=traj.token_ids + traj.tail_ids,
            steps=traj.step_map + traj.tail_steps,
            logprobs=traj.logprobs + traj.tail_logprobs,
        )
        return build_rollout(filled, len(traj.token_ids), traj.finish_reason, self._tokenizer, self._version)
