"""Step maps from LMDeploy's dLLM engine: a version-guarded runtime patch of its scheduler-side sequence.

Upstream LMDeploy (<= 0.18.0) returns token ids but not the step at which each token was unmasked. The
scheduler-side sequence (`SchedulerSequenceDLLM`) sees every forward's post-unmasking mask, in order, in the
process that owns the engine loop, so the step map is recorded there (docs/design.md section 2):

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

Behaviour log-probs travel the same way. The model agent's ``post_sampling`` (``DLLMModelAgentStrategy``) sees
the logits LMDeploy sampled from, after its logits processors, and the token sampled at each position: the patch
adds log softmax(logits)[token] per position to the forward's extra outputs (a subclass of
``DLLMExtraOutputs`` with one more field, so LMDeploy's own copies to CPU and numpy keep it), and
``DLLMSequenceStrategy.update_running`` hands each sequence its row before the token update, where the recorder
stores the values of the positions it stamps. At temperature 1, top-k 0 and top-p 1 the processors leave the
logits alone, so the value is log p(token) under the behaviour policy (the unmasking confidence, in log space).

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
scheduler out of this process. The test oracle ``tests/oracles/lmdeploy_sim.py`` drives LMDeploy's real
scheduler classes on CPU with a fake model and compares the recorded step maps and log-probs with an independent
reference decoder (tests/test_lmdeploy_patch.py, scripts/gpu_check.py); the pinned version passed it.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any

import numpy as np

from services.rollout.engines.sampling import cut_response
from shared.model.sdar import rope_parameters

log = logging.getLogger(__name__)

TESTED_VERSIONS = frozenset({"0.18.0"})
"""LMDeploy releases whose scheduler internals the recorder was checked against."""
INSTALL_HINT = "pip install 'gtpo[lmdeploy]'"
MAX_RECORDS = 65536
"""Published records not yet popped, at most (oldest dropped first, with a warning)."""

_STATE = "_gtpo_step_state"
_MARK = "_gtpo_step_map_patch"
_LOGPROBS = "_gtpo_logprobs"  # attribute: this forward's log-probs, on extra inputs and on each sequence

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

    `token_ids` / `step_map` / `logprobs`: every generated position up to the end of the last decoded block
    (prompt tail excluded), before LMDeploy's own stop truncation; a log-prob is NaN where LMDeploy reported
    none. `engine_ids`: LMDeploy's `generated_ids` after it.
    """

    session_id: int
    token_ids: list[int]
    step_map: list[int]
    engine_ids: list[int]
    stop_pos: int
    error: str | None = None
    logprobs: list[float] = field(default_factory=list)


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


def publish_record(record: StepRecord) -> None:
    """Put a record in the store, as a finishing sequence does (for drivers that collect records themselves)."""
    _STORE.put(record)


@dataclass(frozen=True)
class Trajectory:
    """A response cut at its first stop token (kept) or at max_new_tokens, with the rest of its last block.

    ``logprobs`` / ``tail_logprobs``: the behaviour log-prob of each response / tail token at unmask time.
    """

    token_ids: list[int]
    step_map: list[int]
    tail_ids: list[int]
    tail_steps: list[int]
    finish_reason: str
    logprobs: list[float] = field(default_factory=list)
    tail_logprobs: list[float] = field(default_factory=list)


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
    logps = record.logprobs if len(record.logprobs) == len(ids) else [float("nan")] * len(ids)
    return Trajectory(
        ids[:length], steps[:length], ids[length:end], steps[length:end], reason, logps[:length], logps[length:end]
    )


# --------------------------------------------------------------------------- the recorder


class _Steps:
    """Per-sequence recorder state: absolute position -> step (0 = not generated) and -> log-prob (NaN = none
    reported), and the step counter."""

    __slots__ = ("buf", "logp", "counter", "error")

    def __init__(self) -> None:
        self.buf = np.zeros(256, dtype=np.int32)
        self.logp = np.full(256, np.nan, dtype=np.float64)
        self.counter = 0
        self.error: str | None = None

    def fit(self, size: int) -> None:
        if size > len(self.buf):
            n = max(size, 2 * len(self.buf))
            buf, logp = np.zeros(n, dtype=np.int32), np.full(n, np.nan, dtype=np.float64)
            buf[: len(self.buf)], logp[: len(self.logp)] = self.buf, self.logp
            self.buf, self.logp = buf, logp


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
        st.logp[self.num_history_ids :] = np.nan
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
        logp = self.__dict__.pop(_LOGPROBS, None)  # this forward's, from update_running; None if not reported
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
            if logp is not None and len(logp) == len(new):
                st.logp[start + newly] = logp[newly]
        return None

    return _update_token_ids_decode


def _wrap_stop(orig):
    @functools.wraps(orig)
    def set_stop_pos(self, pos):
        full_ids = np.array(self.generated_ids, copy=True)
        full_steps = self.generated_step_map
        full_logp = _generated(self, "logp")
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
                logprobs=full_logp.tolist(),
            )
        )
        return None

    return set_stop_pos


def _generated(seq: Any, buffer: str) -> np.ndarray:
    """A recorder buffer (`buf` or `logp`) over the positions of `generated_ids` (the same slice, so stop
    truncation is inherited)."""
    end = seq.num_valid_ids
    start = end - seq.num_new_tokens
    st = _steps(seq)
    st.fit(end)
    return getattr(st, buffer)[start:end].copy()


def _generated_step_map(self) -> np.ndarray:
    """Steps of `generated_ids`, position by position."""
    return _generated(self, "buf")


# --------------------------------------------------------------------------- behaviour log-probs


@functools.cache
def _outputs_class(base: type) -> type:
    """`DLLMExtraOutputs` with a log-prob field: LMDeploy copies extra outputs field by field (`to_cpu`, `to_numpy`)."""
    return make_dataclass("DLLMExtraOutputsWithLogprobs", [("logprobs", Any, field(default=None))], bases=(base,))


def sampled_logprobs(logits: Any, token_ids: Any) -> Any:
    """log softmax(logits)[token] per row, in float32. logits: (N, V); token_ids: (N,). Returns (N,)."""
    x = logits.float()
    return x.gather(-1, token_ids.long()[:, None]).squeeze(-1) - x.logsumexp(-1)


def _wrap_post_sampling(orig):
    @functools.wraps(orig)
    def post_sampling(self, inputs, logits, next_token_ids, extra_inputs):
        next_token_ids, extra_inputs = orig(self, inputs, logits, next_token_ids, extra_inputs)
        # unmasked positions hold the tokens sampled from these logits in this forward; the recorder keeps only
        # the positions unmasked now
        setattr(extra_inputs, _LOGPROBS, sampled_logprobs(logits, next_token_ids))
        return next_token_ids, extra_inputs

    return post_sampling


def _wrap_extra_outputs(orig):
    @functools.wraps(orig)
    def make_extra_outputs(self, extra_inputs):
        out = orig(self, extra_inputs)
        logp = getattr(extra_inputs, _LOGPROBS, None)
        if logp is None:
            return out
        values = {f.name: getattr(out, f.name) for f in fields(out)}
        return _outputs_class(type(out))(**values, logprobs=logp)

    return make_extra_outputs


def _wrap_update_running(orig):
    @functools.wraps(orig)
    def update_running(self, running, batched_outputs, model_inputs, delta, **kwargs):
        logp = getattr(getattr(batched_outputs, "extra_outputs", None), "logprobs", None)
        if logp is not None and len(running):
            rows = np.asarray(logp.float().cpu() if hasattr(logp, "cpu") else logp, dtype=np.float64)
            rows = rows.reshape(len(running), -1)
            for seq, row in zip(running, rows, strict=True):
                seq.__dict__[_LOGPROBS] = row
        try:
            return orig(self, running, batched_outputs, model_inputs, delta, **kwargs)
        finally:
            for seq in running:  # a sequence that was not updated (not running) must not keep a stale row
                seq.__dict__.pop(_LOGPROBS, None)

    return update_running


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
        "after tests/test_lmdeploy_*.py and the GPU check pass with it"
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


_EXPECTED_AGENT_METHODS: dict[str, tuple[str, ...]] = {
    "post_sampling": ("self", "inputs", "logits", "next_token_ids", "extra_inputs"),
    "make_extra_outputs": ("self", "extra_inputs"),
}


def check_model_agent(agent_cls: type, outputs_cls: type, strategy_cls: type) -> None:
    """Raise RuntimeError unless the log-prob path's hooks are as the patch expects (names, signatures, fields)."""
    problems = []
    for name, params in _EXPECTED_AGENT_METHODS.items():
        fn = agent_cls.__dict__.get(name)
        got = tuple(inspect.signature(fn).parameters) if callable(fn) else None
        if got != params:
            problems.append(f"{agent_cls.__name__}.{name}{got} != {params}")
    if "dllm_mask" not in getattr(outputs_cls, "__dataclass_fields__", {}):
        problems.append(f"{outputs_cls.__name__} is not a dataclass with dllm_mask")
    run = tuple(inspect.signature(strategy_cls.__dict__["update_running"]).parameters)
    if run[:5] != ("self", "running", "batched_outputs", "model_inputs", "delta"):
        problems.append(f"{strategy_cls.__name__}.update_running{run}")
    if problems:
        raise RuntimeError("LMDeploy internals changed; the log-prob recorder refuses to run: " + "; ".join(problems))


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
        from lmdeploy.pytorch.strategies.dllm.model_agent import DLLMExtraOutputs, DLLMModelAgentStrategy
        from lmdeploy.pytorch.strategies.dllm.sampling import DLLMSamplingStrategy
        from lmdeploy.pytorch.strategies.dllm.sequence import DLLMSequenceStrategy, SchedulerSequenceDLLM

        cls = SchedulerSequenceDLLM
        check_sequence_class(cls, consts)
        _check_update_running(DLLMSequenceStrategy)
        check_model_agent(DLLMModelAgentStrategy, DLLMExtraOutputs, DLLMSequenceStrategy)
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
        agent = DLLMModelAgentStrategy
        agent.post_sampling = _wrap_post_sampling(agent.__dict__["post_sampling"])
        agent.make_extra_outputs = _wrap_extra_outputs(agent.__dict__["make_extra_outputs"])
        DLLMSequenceStrategy.update_running = _wrap_update_running(DLLMSequenceStrategy.__dict__["update_running"])
        _APPLIED = PatchInfo(
            version=lmdeploy.__version__,
            fixes=(
                "step_map",
                "stop_start_pos",
                "mask_token_id",
                "rope_parameters",
                "sampling_layout",
                "per_position_seeds",
                "logprobs",
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
