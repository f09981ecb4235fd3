"""Step maps from LMDeploy's dLLM engine: a version-guarded runtime patch of its scheduler-side sequence.

Upstream LMDeploy (<= 0.18.0) returns token ids but not the step at which each token was unmasked. The
scheduler-side sequence (`SchedulerSequenceDLLM`) sees every forward's post-unmasking mask, in order, in the
process that owns the engine loop, so the step map is recorded there (design.md section 2):

* ``_update_token_ids_inputs`` (a new message): the step buffer restarts (positions before the message keep
  their values, the message's own positions are 0 = not generated) and the per-sequence counter resets.
  It also fixes LMDeploy's first stop bug (Q1): ``output_start_pos`` is computed from the padded input
  length, so the stop-word check ignores the whole first block whenever ``len(prompt) % B != 0``.
* ``_update_token_ids_decode`` (every forward, prefill included: the prefill update calls it for the last
  block): the positions of the current block that went MASKED -> UNMASKED in this forward get
  ``counter + 1``. A forward that unmasks nothing (the KV-store pass of a finished block) does not count.
  Positions are never reset outside a new message, so a sequence that is preempted (``set_step(0)``) and
  re-prefilled keeps its earlier steps.
* ``set_stop_pos`` (every finish goes through it, stop word or ``max_new_tokens``): the whole decoded
  region, up to the end of the last block and before LMDeploy truncates it, is published in a bounded
  store keyed by session id; the engine pops it when the request ends (:func:`pop_record`).

LMDeploy's second stop bug (Q2: in the block where ``max_new_tokens`` is reached, the length position wins
over an earlier stop word) and any stop id that slips past its check are handled by :func:`finalize`,
which cuts token ids and steps together at the first stop id, as the torch engine does.

Two more fixes, both in LMDeploy's dLLM sampling inputs (``DLLMSamplingStrategy.make_sampling_inputs``):
it repeats per-sequence 1-D settings (temperature, top-k, top-p, seeds, offsets) position-major while the
logit rows are sequence-major, so in a batch of n sequences row (s, p) uses sequence ``(s*B + p) % n``'s
values; and all B positions of a block share one (seed, offset), hence one uniform per step. The patch
re-lays the 1-D rows sequence-major and gives each block position its own seed, so the positions unmasked
together are independent draws, as the trainer's per-token log-probs assume.

The patch refuses an untested LMDeploy version, changed internals, and configurations that move the
scheduler out of this process. :func:`self_check` drives LMDeploy's real scheduler classes on CPU with a
fake model and compares the recorded step maps with an independent reference decoder.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.rollout.engines.sampling import cut_response
from shared.model import rope_parameters

log = logging.getLogger(__name__)

TESTED_VERSIONS = frozenset({"0.18.0"})
"""LMDeploy releases whose scheduler internals the recorder was checked against."""
INSTALL_HINT = "pip install 'gtpo[lmdeploy]'"
MAX_RECORDS = 65536
"""Published records not yet popped, at most (oldest dropped first, with a warning)."""

_STATE = "_gtpo_step_state"
_MARK = "_gtpo_step_map_patch"

_EXPECTED_METHODS: dict[str, tuple[str, ...]] = {
    "_update_token_ids_inputs": ("self", "token_ids", "dllm_mask"),
    "_update_token_ids_decode": ("self", "token_ids", "dllm_mask"),
    "_update_token_ids_prefill": ("self", "token_ids", "dllm_mask"),
    "set_stop_pos": ("self", "pos"),
    "set_step": ("self", "step"),
}
_EXPECTED_PROPERTIES = ("generated_ids", "num_valid_ids", "dllm_mask", "dllm_block_length")
_SAMPLING_1D_FIELDS = (
    "temperature",
    "repetition_penalty",
    "top_k",
    "top_p",
    "min_p",
    "random_seeds",
    "random_offsets",
    "num_ignore_eos",
    "repetition_ngram_size",
    "repetition_ngram_threshold",
)
_SEED_STRIDE = 0x9E3779B9  # odd: positions 0..255 of a block get distinct 32-bit seeds


class LMDeployNotInstalledError(ImportError):
    """LMDeploy is an optional, GPU-only extra."""


def import_lmdeploy() -> Any:
    """The `lmdeploy` package, or an error that names the extra to install."""
    try:
        import lmdeploy
    except ImportError as e:
        raise LMDeployNotInstalledError(
            f"the 'lmdeploy' rollout engine needs LMDeploy, an optional GPU extra: {INSTALL_HINT} "
            f"(tested with lmdeploy {', '.join(sorted(TESTED_VERSIONS))}); on CPU use engine 'torch' ({e})"
        ) from e
    return lmdeploy


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class StepRecord:
    """What the recorder saw for one finished sequence.

    `token_ids` / `step_map`: every generated position up to the end of the last decoded block (prompt tail
    excluded), before LMDeploy's own stop truncation. `engine_ids`: LMDeploy's `generated_ids` after it.
    """

    session_id: int
    token_ids: list[int]
    step_map: list[int]
    engine_ids: list[int]
    stop_pos: int
    error: str | None = None


class _RecordStore:
    """Finished sequences' records, keyed by session id; written in the engine loop, popped by the engine."""

    def __init__(self, limit: int) -> None:
        self._records: OrderedDict[int, StepRecord] = OrderedDict()
        self._lock = threading.Lock()
        self.limit = limit

    def put(self, record: StepRecord) -> None:
        with self._lock:
            self._records[record.session_id] = record
            self._records.move_to_end(record.session_id)
            while len(self._records) > self.limit:
                sid, _ = self._records.popitem(last=False)
                log.warning("step-map store full: dropped the record of session %d (never popped)", sid)

    def pop(self, session_id: int) -> StepRecord | None:
        with self._lock:
            return self._records.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._records)


_STORE = _RecordStore(MAX_RECORDS)


def pop_record(session_id: int) -> StepRecord | None:
    """The record of a finished session (once); None if it never finished (cancelled, aborted)."""
    return _STORE.pop(session_id)


@dataclass(frozen=True)
class Trajectory:
    """A response cut at its first stop token (kept) or at max_new_tokens, with the rest of its last block."""

    token_ids: list[int]
    step_map: list[int]
    tail_ids: list[int]
    tail_steps: list[int]
    finish_reason: str


def finalize(
    record: StepRecord, *, prompt_len: int, block_size: int, max_new_tokens: int, stop_token_ids: Sequence[int]
) -> Trajectory:
    """Cut token ids and step map together at the first stop id, ourselves (LMDeploy's stop bugs Q1, Q2).

    The tail is the rest of the block holding the last response token: the trainer places it, never trains
    it. Positions LMDeploy decoded past that block (only possible when its stop check missed a stop id)
    never influenced the response (attention is block-causal) and are dropped.

    Raises:
        RuntimeError: the recorder failed, or LMDeploy stopped with neither a stop id nor max_new_tokens.
    """
    if record.error:
        raise RuntimeError(f"step-map recorder failed for session {record.session_id}: {record.error}")
    ids, steps = record.token_ids, record.step_map
    length, reason = cut_response(ids, max_new_tokens, list(stop_token_ids))
    if not reason:
        raise RuntimeError(
            f"LMDeploy finished session {record.session_id} after {len(ids)} tokens with neither a stop id "
            f"{list(stop_token_ids)} nor max_new_tokens={max_new_tokens}"
        )
    end = -(-(prompt_len + length) // block_size) * block_size - prompt_len
    if len(ids) < end:
        raise RuntimeError(
            f"session {record.session_id}: LMDeploy reported {len(ids)} positions, the block ends at {end}"
        )
    if any(s < 1 for s in steps[:end]):
        raise RuntimeError(f"session {record.session_id}: unstamped positions in the step map {steps[:end]}")
    return Trajectory(ids[:length], steps[:length], ids[length:end], steps[length:end], reason)


# --------------------------------------------------------------------------- the recorder


class _Steps:
    """Per-sequence recorder state: absolute position -> step (0 = not generated), and the step counter."""

    __slots__ = ("buf", "counter", "error")

    def __init__(self) -> None:
        self.buf = np.zeros(256, dtype=np.int32)
        self.counter = 0
        self.error: str | None = None

    def fit(self, size: int) -> None:
        if size > len(self.buf):
            grown = np.zeros(max(size, 2 * len(self.buf)), dtype=np.int32)
            grown[: len(self.buf)] = self.buf
            self.buf = grown


def _steps(seq: Any) -> _Steps:
    state = seq.__dict__.get(_STATE)
    if state is None:
        state = seq.__dict__[_STATE] = _Steps()
    return state


@dataclass
class _Options:
    fix_output_start: bool = True


_OPTIONS = _Options()


def set_output_start_fix(enabled: bool) -> None:
    """Toggle the Q1 fix (tests reproduce the upstream bug with it off)."""
    _OPTIONS.fix_output_start = enabled


def _wrap_inputs(orig):
    @functools.wraps(orig)
    def _update_token_ids_inputs(self, token_ids, dllm_mask):
        orig(self, token_ids, dllm_mask)
        st = _steps(self)
        st.fit(len(self.history_cache))
        st.buf[self.num_history_ids :] = 0
        st.counter, st.error = 0, None
        _STORE.pop(self.session_id)  # a stale record of an earlier message of this session
        if _OPTIONS.fix_output_start:
            self.output_start_pos = self.num_valid_ids  # Q1: the first generated position, not the padded end
        return None

    return _update_token_ids_inputs


def _wrap_decode(orig, masked: int, unmasked: int):
    @functools.wraps(orig)
    def _update_token_ids_decode(self, token_ids, dllm_mask):
        start = self.num_history_ids
        new = np.asarray(dllm_mask)
        old = np.array(self.history_dllm_mask[start : start + len(new)], copy=True)
        orig(self, token_ids, dllm_mask)
        st = _steps(self)
        if len(old) != len(new):
            st.error = f"history holds {len(old)} mask entries at {start}, the update has {len(new)}"
            return None
        newly = np.flatnonzero((old == masked) & (new == unmasked))
        if len(newly):
            st.counter += 1
            st.fit(start + len(new))
            st.buf[start + newly] = st.counter
        return None

    return _update_token_ids_decode


def _wrap_stop(orig):
    @functools.wraps(orig)
    def set_stop_pos(self, pos):
        full_ids = np.array(self.generated_ids, copy=True)
        full_steps = self.generated_step_map
        orig(self, pos)
        st = _steps(self)
        _STORE.put(
            StepRecord(
                session_id=int(self.session_id),
                token_ids=full_ids.tolist(),
                step_map=full_steps.tolist(),
                engine_ids=np.asarray(self.generated_ids).tolist(),
                stop_pos=int(pos),
                error=st.error,
            )
        )
        return None

    return set_stop_pos


def _generated_step_map(self) -> np.ndarray:
    """Steps of `generated_ids`, position by position (the same slice, so stop truncation is inherited)."""
    end = self.num_valid_ids
    start = end - self.num_new_tokens
    st = _steps(self)
    st.fit(end)
    return st.buf[start:end].copy()


def _wrap_mask_id(orig_func):
    """SDAR's config builder hard-codes mask id 151669; honour config.json's `mask_token_id` when present.
    Also fills `rope_parameters` from SDAR's `rope_theta` / `rope_scaling` where transformers 5 left it None: SDAR
    is not a transformers model type, so its config loads as a plain `PreTrainedConfig`, and LMDeploy's rotary
    builder calls `.get` on `rope_parameters`."""

    @functools.wraps(orig_func)
    def build(cls, hf_config, model_path: str | None = None, **kwargs):
        if getattr(hf_config, "rope_parameters", None) is None:
            hf_config.rope_parameters = rope_parameters(hf_config.to_dict())
        cfg = orig_func(cls, hf_config, model_path, **kwargs)
        mask_id = getattr(hf_config, "mask_token_id", None)
        if mask_id is not None:
            cfg.dllm_mask_token = int(mask_id)
        return cfg

    return classmethod(build)


def _wrap_sampling_inputs(orig):
    @functools.wraps(orig)
    def make_sampling_inputs(self, seqs):
        out = orig(self, seqs)
        return relayout_sampling_inputs(out, len(seqs), self.dllm_block_length)

    return make_sampling_inputs


def relayout_sampling_inputs(out: Any, num_seqs: int, block: int) -> Any:
    """Sequence-major per-position sampling rows, and a distinct seed per block position (see module doc)."""
    import torch

    for name in _SAMPLING_1D_FIELDS:
        attr = getattr(out, name, None)
        if not isinstance(attr, torch.Tensor) or attr.dim() != 1 or attr.numel() != num_seqs * block:
            continue
        setattr(out, name, attr.view(block, num_seqs).t().reshape(-1).contiguous())
    seeds = getattr(out, "random_seeds", None)
    if isinstance(seeds, torch.Tensor) and seeds.numel() == num_seqs * block:
        pos = torch.arange(block, dtype=seeds.dtype, device=seeds.device).repeat(num_seqs)
        out.random_seeds = (seeds + pos * _SEED_STRIDE) & 0xFFFFFFFF
    return out


# --------------------------------------------------------------------------- guard and install


@dataclass(frozen=True)
class PatchInfo:
    version: str
    fixes: tuple[str, ...] = field(default=())


_APPLIED: PatchInfo | None = None
_LOCK = threading.Lock()


def check_version(version: str, *, allow_untested: bool = False) -> None:
    if version in TESTED_VERSIONS:
        return
    msg = (
        f"lmdeploy {version} is untested with the step-map recorder (tested: {', '.join(sorted(TESTED_VERSIONS))}); "
        f"install a tested version ({INSTALL_HINT} pins it) or pass allow_untested_lmdeploy=True "
        "after the CPU self-check and the GPU check pass"
    )
    if not allow_untested:
        raise RuntimeError(msg)
    log.warning("%s: continuing because allow_untested_lmdeploy=True", msg)


def check_sequence_class(cls: type, consts: Any) -> None:
    """Raise RuntimeError unless `cls` has the internals the recorder hooks (names, signatures, constants)."""
    problems = []
    if (consts.DLLM_MASKED, consts.DLLM_UNMASKED, consts.DLLM_CACHED) != (0, 1, 2):
        problems.append("DLLM_MASKED/UNMASKED/CACHED changed")
    for name, params in _EXPECTED_METHODS.items():
        fn = cls.__dict__.get(name)
        if not callable(fn):
            problems.append(f"{cls.__name__}.{name} missing")
            continue
        fn = getattr(fn, "__wrapped__", fn)
        got = tuple(inspect.signature(fn).parameters)
        if got != params:
            problems.append(f"{cls.__name__}.{name}{got} != {params}")
    for name in _EXPECTED_PROPERTIES:
        if not hasattr(cls, name):
            problems.append(f"{cls.__name__}.{name} missing")
    if "history_dllm_mask" not in getattr(cls, "__dataclass_fields__", {}):
        problems.append(f"{cls.__name__}.history_dllm_mask missing")
    if hasattr(cls, "generated_step_map") and not getattr(cls, _MARK, False):
        problems.append(f"{cls.__name__} already has generated_step_map: upstream records step maps now")
    if problems:
        raise RuntimeError("LMDeploy internals changed; the step-map recorder refuses to run: " + "; ".join(problems))


def _check_update_running(strategy_cls: type) -> None:
    src = inspect.getsource(strategy_cls.update_running)
    if "set_stop_pos" not in src or "update_token_ids" not in src:
        raise RuntimeError(
            "LMDeploy internals changed: DLLMSequenceStrategy.update_running no longer calls "
            "update_token_ids and set_stop_pos; the step-map recorder refuses to run"
        )


def apply_patch(*, allow_untested: bool = False) -> PatchInfo:
    """Install the recorder and the fixes (idempotent). Raises if LMDeploy is missing, untested or changed."""
    global _APPLIED
    lmdeploy = import_lmdeploy()
    with _LOCK:
        if _APPLIED is not None:
            return _APPLIED
        check_version(lmdeploy.__version__, allow_untested=allow_untested)
        from lmdeploy.pytorch import consts
        from lmdeploy.pytorch.configurations.sdar import SDARModelConfigBuilder
        from lmdeploy.pytorch.strategies.dllm.sampling import DLLMSamplingStrategy
        from lmdeploy.pytorch.strategies.dllm.sequence import DLLMSequenceStrategy, SchedulerSequenceDLLM

        cls = SchedulerSequenceDLLM
        check_sequence_class(cls, consts)
        _check_update_running(DLLMSequenceStrategy)
        if not isinstance(SDARModelConfigBuilder.__dict__.get("build"), classmethod):
            raise RuntimeError("LMDeploy internals changed: SDARModelConfigBuilder.build is not a classmethod")
        if not callable(DLLMSamplingStrategy.__dict__.get("make_sampling_inputs")):
            raise RuntimeError("LMDeploy internals changed: DLLMSamplingStrategy.make_sampling_inputs missing")

        cls._update_token_ids_inputs = _wrap_inputs(cls.__dict__["_update_token_ids_inputs"])
        cls._update_token_ids_decode = _wrap_decode(
            cls.__dict__["_update_token_ids_decode"], consts.DLLM_MASKED, consts.DLLM_UNMASKED
        )
        cls.set_stop_pos = _wrap_stop(cls.__dict__["set_stop_pos"])
        cls.generated_step_map = property(_generated_step_map)
        setattr(cls, _MARK, True)
        SDARModelConfigBuilder.build = _wrap_mask_id(SDARModelConfigBuilder.__dict__["build"].__func__)
        DLLMSamplingStrategy.make_sampling_inputs = _wrap_sampling_inputs(
            DLLMSamplingStrategy.__dict__["make_sampling_inputs"]
        )
        _APPLIED = PatchInfo(
            version=lmdeploy.__version__,
            fixes=(
                "step_map",
                "stop_start_pos",
                "mask_token_id",
                "rope_parameters",
                "sampling_layout",
                "per_position_seeds",
            ),
        )
        log.info("lmdeploy %s: step-map recorder installed", lmdeploy.__version__)
        return _APPLIED


def check_engine_config(cfg: Any) -> None:
    """Refuse configurations that move the scheduler out of this process or reuse KV across weights.

    Raises:
        ValueError: naming every offending setting.
    """
    problems = []
    if getattr(cfg, "enable_mp_engine", False):
        problems.append("enable_mp_engine=True runs the scheduler in a child process the recorder cannot see")
    if getattr(cfg, "dp", 1) != 1:
        problems.append(f"dp={cfg.dp}: data-parallel engines schedule in other processes")
    role = getattr(cfg, "role", None)
    if role is not None and getattr(role, "name", str(role)) != "Hybrid":
        problems.append(f"role={role}: prefill/decode disaggregation moves sequences between engines")
    if getattr(cfg, "kv_transfer_config", None) is not None:
        problems.append("kv_transfer_config: KV transfer moves sequences between engines")
    if getattr(cfg, "enable_prefix_caching", False):
        problems.append("enable_prefix_caching=True would reuse KV computed with older weights")
    if problems:
        raise ValueError("lmdeploy engine config: " + "; ".join(problems))


# --------------------------------------------------------------------------- CPU driver and reference


@dataclass(frozen=True)
class SimConfig:
    """One CPU run of LMDeploy's scheduler classes with a fake model (see :func:`simulate`)."""

    block_size: int = 4
    strategy: str = "low_confidence_dynamic"
    threshold: float = 0.9
    denoising_steps: int | None = None
    max_new_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    vocab: int = 16
    logit_width: int = 0
    logit_scale: float = 4.0
    num_gpu_blocks: int = 64
    paging_block: int = 16
    max_batches: int = 8
    preempt_prob: float = 0.0

    @property
    def mask_token_id(self) -> int:
        return self.vocab  # never sampled: the fake model draws from [0, vocab)

    @property
    def width(self) -> int:
        """Logit columns: at least every id a prompt may hold (LMDeploy gathers scores at given positions too)."""
        return max(self.vocab + 1, self.logit_width)


@contextlib.contextmanager
def _one_thread():
    """Tiny CPU tensors: torch's intra-op thread pool costs ~1000x the work itself."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fake_forward(seed: int, block_start: int, block_ids: Sequence[int], cfg: SimConfig) -> tuple[Any, np.ndarray]:
    """The fake model: logits (B, V) float32 tensor and sampled tokens (B,), a pure function of the block state.

    Depending only on (seed, block position, block contents) makes the trajectory independent of batching,
    preemption and re-prefill, so one reference decoder serves every schedule.
    """
    import torch

    digest = hashlib.blake2b(
        np.asarray([seed, block_start, *block_ids], dtype=np.int64).tobytes(), digest_size=8
    ).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    b, v = len(block_ids), cfg.vocab
    logits = rng.normal(size=(b, v)) * rng.uniform(0.0, cfg.logit_scale, size=(b, 1))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    u = rng.random((b, 1))
    tokens = np.minimum((probs.cumsum(1) < u).sum(1), v - 1).astype(np.int64)
    padded = np.full((b, cfg.width), -1e9)
    padded[:, :v] = logits
    return torch.tensor(padded, dtype=torch.float32), tokens


def reference_decode(prompt: Sequence[int], seed: int, cfg: SimConfig) -> Trajectory:
    """Independent reference: decode one sequence block by block with our own unmasking rules (sampling.py)."""
    with _one_thread():
        return _reference_decode(prompt, seed, cfg)


def _reference_decode(prompt: Sequence[int], seed: int, cfg: SimConfig) -> Trajectory:
    import torch

    from services.rollout.engines.sampling import select_unmask, strategy_codes
    from shared.contracts import Strategy

    b, mask = cfg.block_size, cfg.mask_token_id
    code = strategy_codes([Strategy(cfg.strategy)])
    threshold = torch.tensor([cfg.threshold])
    per_step = torch.tensor([max(1, b // (cfg.denoising_steps or b))])
    full = len(prompt) // b * b
    tail = list(prompt[full:])
    tokens: list[int] = []
    steps: list[int] = []
    counter, start = 0, full
    while True:
        cur = tail + [mask] * (b - len(tail))
        block_steps = [0] * b
        masked = torch.tensor([[i >= len(tail) for i in range(b)]])
        while bool(masked.any()):
            logits, sampled = fake_forward(seed, start, cur, cfg)
            conf = logits.softmax(-1).gather(-1, torch.as_tensor(sampled)[:, None]).squeeze(-1)
            sel = select_unmask(conf[None], masked, code, threshold, per_step)[0]
            counter += 1
            for i in sel.nonzero().squeeze(1).tolist():
                cur[i], block_steps[i] = int(sampled[i]), counter
            masked &= ~sel[None]
        tokens += cur[len(tail) :]
        steps += block_steps[len(tail) :]
        tail, start = [], start + b
        length, reason = cut_response(tokens, cfg.max_new_tokens, list(cfg.stop_token_ids))
        if reason:
            return Trajectory(tokens[:length], steps[:length], tokens[length:], steps[length:], reason)


@dataclass
class SimResult:
    records: dict[int, StepRecord]
    forwards: int = 0
    prefills: int = 0
    re_prefills: int = 0
    preemptions: int = 0
    evictions: int = 0


class _Sim:
    """Drives LMDeploy's real scheduler-side classes through prefill, decode, preemption/re-prefill and stop.

    Real: `Scheduler` (paging, admission, eviction), `SchedulerSequenceDLLM` (patched), `DLLMSequenceStrategy.
    update_running`, `DLLMModelAgentStrategy` (extra inputs, slicing, `post_sampling` -> `UnmaskingProcessor`,
    stopping criteria), `DLLMSamplingStrategy.make_sampling_inputs` (stop words), `step_inputs._update_dllm`.
    Replaced: the model forward and the sampler (:func:`fake_forward`). After every forward the scheduler's
    view of each running sequence is checked against the device-side state `_update_dllm` computes.
    """

    def __init__(self, cfg: SimConfig, rng_seed: int) -> None:
        from lmdeploy.pytorch.config import CacheConfig, DLLMConfig, SchedulerConfig, UnmaskingStrategy
        from lmdeploy.pytorch.messages import SequenceMeta
        from lmdeploy.pytorch.paging.scheduler import Scheduler
        from lmdeploy.pytorch.strategies.dllm.engine import DLLMEngineStrategy
        from lmdeploy.pytorch.strategies.dllm.model_agent import DLLMModelAgentStrategy
        from lmdeploy.pytorch.strategies.dllm.sampling import DLLMSamplingStrategy
        from lmdeploy.pytorch.strategies.dllm.sequence import DLLMSequenceStrategy

        self.cfg, b = cfg, cfg.block_size
        dllm = DLLMConfig(
            block_length=b,
            unmasking_strategy=UnmaskingStrategy.from_str(cfg.strategy),
            denoising_steps=cfg.denoising_steps or b,
            confidence_threshold=cfg.threshold,
        )
        sched_cfg = SchedulerConfig(max_batches=cfg.max_batches, max_session_len=1 << 16)
        cache_cfg = CacheConfig(
            max_batches=cfg.max_batches,
            block_size=cfg.paging_block,
            num_cpu_blocks=0,
            num_gpu_blocks=cfg.num_gpu_blocks,
        )
        self.seq_strategy = DLLMSequenceStrategy(b, cfg.mask_token_id)
        self.agent = DLLMModelAgentStrategy(dllm, cfg.mask_token_id)
        self.sampling = DLLMSamplingStrategy(0, b)
        engine_strategy = DLLMEngineStrategy(sched_cfg, cache_cfg, b)
        self.prealloc = engine_strategy.get_prealloc_size(True)
        self.required = engine_strategy.get_num_required_tokens()
        self.sched = Scheduler(
            sched_cfg, cache_cfg, seq_meta=SequenceMeta(cfg.paging_block, strategy=self.seq_strategy)
        )
        self.rng = np.random.default_rng(rng_seed)
        self.seeds: dict[int, int] = {}
        self.index: dict[int, int] = {}  # session id -> request index
        self.device: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # seq id -> (ids, mask) the device holds next
        self.running: list[Any] = []
        self.seen_history: dict[int, int] = {}  # seq id -> the most history it ever had (eviction detection)

    def add(self, index: int, sid: int, prompt: Sequence[int], seed: int) -> None:
        from lmdeploy.pytorch.messages import SamplingParam

        session = self.sched.add_session(sid)
        param = SamplingParam(max_new_tokens=self.cfg.max_new_tokens, stop_words=list(self.cfg.stop_token_ids))
        session.add_sequence(np.asarray(prompt, dtype=np.int64), sampling_param=param)
        self.seeds[sid], self.index[sid] = seed, index

    def _inputs(self, seqs, prefill: bool):
        import torch
        from lmdeploy.pytorch.model_inputs import ModelInputs

        ids = [np.asarray(s.token_ids) for s in seqs]
        seq_len = torch.tensor([len(x) for x in ids])
        hist = torch.tensor([s.num_history_ids for s in seqs])
        kv = seq_len + hist
        return ModelInputs(
            input_ids=torch.as_tensor(np.concatenate(ids))[None],
            seq_length=seq_len,
            history_lengths=hist,
            block_offsets=None,
            is_decoding=not prefill,
            num_ignored_history=torch.zeros(len(seqs), dtype=torch.long),
            max_q_seqlen=int(seq_len.max()),
            max_kv_seqlen=int(kv.max()),
            sum_kv_seqlen=int(kv.sum()),
        )

    def forward(self, seqs, prefill: bool) -> None:
        import torch
        from lmdeploy.pytorch.engine.model_agent import BatchedOutputs
        from lmdeploy.pytorch.strategies.dllm.step_inputs import _update_dllm

        b, n = self.cfg.block_size, len(seqs)
        inputs = self._inputs(seqs, prefill)
        extra = self.agent.make_extra_inputs(seqs, inputs)
        stopping = self.agent.make_stopping_criteria(seqs)
        sampling = self.sampling.make_sampling_inputs(seqs)
        extra = self.agent.slice_extra_inputs(extra, inputs, None)
        last = self.agent.slice_outputs(inputs.input_ids.flatten(), inputs.seq_length).view(n, b)
        mask_in = extra.dllm_mask.view(n, b)
        for s, ids_, m in zip(seqs, last.numpy(), mask_in.numpy(), strict=True):
            want = self.device.pop(s.seq_id, None)
            if not prefill and want is not None:
                assert np.array_equal(want[0], ids_) and np.array_equal(want[1], m), "scheduler != device state"
        logits, sampled = [], []
        for s, ids_ in zip(seqs, last.tolist(), strict=True):
            start = s.num_history_ids + len(s.token_ids) - b
            lg, tok = fake_forward(self.seeds[s.session_id], start, ids_, self.cfg)
            logits.append(lg)
            sampled.append(tok)
        next_ids, extra = self.agent.post_sampling(
            inputs, torch.cat(logits), torch.as_tensor(np.concatenate(sampled)), extra
        )
        stopped, stop_pos, _ = stopping.step(next_ids, sampling.stop_words, inputs=inputs, extra_inputs=extra)
        out = BatchedOutputs(
            next_token_ids=next_ids,
            stopped=stopped,
            stop_pos=stop_pos,
            extra_outputs=self.agent.make_extra_outputs(extra),
        )
        dev_ids, dev_mask, _ = _update_dllm(next_ids, extra.dllm_mask, torch.full((n,), b), b, self.cfg.mask_token_id)
        for s, ids_, m in zip(seqs, dev_ids.view(n, b).numpy(), dev_mask.view(n, b).numpy(), strict=True):
            self.device[s.seq_id] = (ids_.copy(), m.copy())
        self.seq_strategy.update_running(running=seqs, batched_outputs=out, model_inputs=inputs, delta=None)

    # the engine loop, one forward per call

    def prefill_step(self, result: SimResult) -> None:
        seqs = self.sched.schedule(is_prefill=True, prealloc_size=0).running
        if not seqs:
            if not self.running:
                raise RuntimeError("simulate: nothing schedulable (KV pool too small for one sequence)")
            return
        self.sched.activate_seqs(seqs)
        for s in seqs:
            result.prefills += 1
            if s.seq_id in self.seen_history:
                result.re_prefills += 1
                result.evictions += int(s.num_history_ids == 0 and self.seen_history[s.seq_id] > 0)
            self.device.pop(s.seq_id, None)
        self.forward(seqs, prefill=True)
        result.forwards += 1
        self.running += seqs

    def decode_step(self, result: SimResult) -> None:
        from lmdeploy.pytorch.messages import MessageStatus

        if self.cfg.preempt_prob and self.running and self.rng.random() < self.cfg.preempt_prob:
            victim = self.running[int(self.rng.integers(len(self.running)))]
            self.sched.preempt_seqs([victim])
            result.preemptions += 1
        self.running = [s for s in self.running if s.status == MessageStatus.RUNNING]
        if self.running:
            valid = self.sched.schedule_running(
                self.running, num_required_tokens=self.required, prealloc_size=self.prealloc
            )
            result.preemptions += valid.count(False)
            self.running = [s for s, ok in zip(self.running, valid, strict=True) if ok]
        if self.running:
            self.forward(self.running, prefill=False)
            result.forwards += 1

    def collect(self, result: SimResult, keep_published: bool) -> None:
        """Finished sequences: take their records and end their sessions, as the engine's response path does."""
        from lmdeploy.pytorch.messages import MessageStatus

        for s in self.running:
            self.seen_history[s.seq_id] = max(self.seen_history.get(s.seq_id, 0), s.num_history_ids)
            if s.status != MessageStatus.STOPPED:
                continue
            sid = s.session_id
            rec = pop_record(sid)
            if rec is None:
                raise RuntimeError(f"simulate: session {sid} stopped without a record")
            result.records[self.index[sid]] = rec
            if keep_published:
                _STORE.put(rec)
            self.sched.end_session(sid)
            self.device.pop(s.seq_id, None)
        self.running = [s for s in self.running if s.status == MessageStatus.RUNNING]


def simulate(
    prompts: Sequence[Sequence[int]],
    seeds: Sequence[int],
    cfg: SimConfig,
    *,
    rng_seed: int = 0,
    session_ids: Sequence[int] | None = None,
    keep_published: bool = False,
) -> SimResult:
    """Decode `prompts` through LMDeploy's real scheduler classes on CPU; the recorder's output per prompt.

    Preemption happens when the KV pool (`num_gpu_blocks`) runs short, and at random with `preempt_prob`
    per decode step; preempted sequences that lose their blocks restart from `set_step(0)` and re-prefill.
    `keep_published` leaves the records in the store for a consumer that pops them by session id.
    """
    apply_patch()
    with _one_thread():
        return _simulate(prompts, seeds, cfg, rng_seed, session_ids, keep_published)


def _simulate(prompts, seeds, cfg, rng_seed, session_ids, keep_published) -> SimResult:
    sim = _Sim(cfg, rng_seed)
    sids = list(session_ids) if session_ids is not None else [1000 + i for i in range(len(prompts))]
    for i, (p, s) in enumerate(zip(prompts, seeds, strict=True)):
        sim.add(i, sids[i], p, s)
    result = SimResult(records={})
    for _ in range(100_000):
        if len(result.records) == len(prompts):
            return result
        if sim.sched.has_waiting() and (not sim.running or sim.rng.random() < 0.5):
            sim.prefill_step(result)
        else:
            sim.decode_step(result)
        sim.collect(result, keep_published)
    raise RuntimeError("simulate: did not finish")


def _check_sampling_layout() -> None:
    """Per-sequence sampling rows come out sequence-major, with one seed per block position."""
    from lmdeploy.pytorch.messages import SamplingParam

    cfg = SimConfig()
    sim = _Sim(cfg, rng_seed=0)
    temps = [0.5, 1.0, 1.5]
    for i, temp in enumerate(temps):
        session = sim.sched.add_session(900 + i)
        param = SamplingParam(temperature=temp, top_k=0, random_seed=100 + i, max_new_tokens=4)
        session.add_sequence(np.array([1, 2, 3]), sampling_param=param)
    out = sim.sampling.make_sampling_inputs(sim.sched.waiting)
    b = cfg.block_size
    rows = out.temperature.view(len(temps), b).tolist()
    seeds = out.random_seeds.tolist()
    if rows != [[t] * b for t in temps] or len(set(seeds)) != len(seeds):
        raise RuntimeError(f"LMDeploy sampling-row layout self-check failed: temperatures {rows}, seeds {seeds}")


def self_check() -> None:
    """Startup check against the installed LMDeploy: recorder == reference on a few schedules, and the layout of
    the sampling rows (< 1 s).

    Raises:
        RuntimeError: on any mismatch, so the service refuses to start rather than serve wrong step maps.
    """
    apply_patch()
    with _one_thread():
        _check_sampling_layout()
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8, 9], [3], [2, 4, 6, 8, 10, 12, 14]]
    cases = [
        SimConfig(strategy="sequential", max_new_tokens=9, stop_token_ids=(3,), num_gpu_blocks=3, preempt_prob=0.3),
        SimConfig(threshold=0.3, max_new_tokens=10, stop_token_ids=(5,), num_gpu_blocks=3, preempt_prob=0.3),
        SimConfig(strategy="low_confidence_static", block_size=8, denoising_steps=4, max_new_tokens=12),
    ]
    for cfg in cases:
        seeds = list(range(len(prompts)))
        res = simulate(prompts, seeds, cfg, rng_seed=1)
        for i, (p, s) in enumerate(zip(prompts, seeds, strict=True)):
            got = finalize(
                res.records[i],
                prompt_len=len(p),
                block_size=cfg.block_size,
                max_new_tokens=cfg.max_new_tokens,
                stop_token_ids=cfg.stop_token_ids,
            )
            want = reference_decode(p, s, cfg)
            if got != want:
                raise RuntimeError(f"LMDeploy step-map self-check failed ({cfg}, prompt {i}): {got} != {want}")
