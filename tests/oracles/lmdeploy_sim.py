"""A CPU driver of LMDeploy's real dLLM scheduler classes, with a fake model, and an independent reference decoder:
what the step-map recorder (`lmdeploy_patch`) is checked against, by the tests and
`scripts/gpu_check.py` (:func:`self_check`).

The driver (:func:`simulate`) runs LMDeploy's scheduler, sequence, unmasking, stopping and sampling-input code as
the engine loop does, through prefill, decode, preemption (random and KV-pool pressure), eviction + re-prefill and
stop; only the model forward and the sampler are replaced by a :data:`SimModel`. The reference
(:func:`reference_decode`) decodes the same model with our own unmasking rules (sampling.py). A model whose output
depends only on the sequence state makes the trajectory independent of the schedule, so both must agree exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.rollout.engines.lmdeploy_patch import (
    StepRecord,
    Trajectory,
    apply_patch,
    finalize,
    pop_record,
    publish_record,
)
from services.rollout.engines.sampling import cut_response

SimModel = Callable[[int, np.ndarray, np.ndarray, int, int, float], tuple[Any, np.ndarray]]
"""(seed, ids, masked, block_start, prompt_len, temperature) -> (logits (B, W) float32 tensor at temperature 1,
sampled tokens (B,) int64 drawn at ``temperature``).

``ids``: the sequence through the end of the current block (prompt, decoded blocks, the block's current state,
masks included); the block starts at ``block_start``; ``masked`` (B,) bool: its positions still masked (a model
may sample the mask id itself, so the ids alone do not say). Must be a pure function of its arguments."""


@dataclass(frozen=True)
class SimConfig:
    """One CPU run of LMDeploy's scheduler classes (see :func:`simulate`). ``vocab``, ``logit_width`` and
    ``logit_scale`` describe the fake model; ``mask_id`` is the mask token of another :data:`SimModel`."""

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
    mask_id: int | None = None
    temperature: float = 1.0  # the run's sampling temperature

    @property
    def mask_token_id(self) -> int:
        """``mask_id``, else ``vocab``: never sampled, the fake model draws from [0, vocab)."""
        return self.vocab if self.mask_id is None else self.mask_id

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


def fake_forward(
    seed: int, block_start: int, block_ids: Sequence[int], cfg: SimConfig, temperature: float = 1.0
) -> tuple[Any, np.ndarray]:
    """The fake model: logits (B, V) float32 tensor at temperature 1 and tokens (B,) sampled at `temperature`, a
    pure function of the block state.

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
    probs = np.exp((logits - logits.max(1, keepdims=True)) / temperature)
    probs /= probs.sum(1, keepdims=True)
    u = rng.random((b, 1))
    tokens = np.minimum((probs.cumsum(1) < u).sum(1), v - 1).astype(np.int64)
    padded = np.full((b, cfg.width), -1e9)
    padded[:, :v] = logits
    return torch.tensor(padded, dtype=torch.float32), tokens


def fake_model(cfg: SimConfig) -> SimModel:
    """:func:`fake_forward` as a :data:`SimModel` (it reads the current block alone)."""

    def model(
        seed: int, ids: np.ndarray, masked: np.ndarray, block_start: int, prompt_len: int, temperature: float
    ) -> tuple[Any, np.ndarray]:
        return fake_forward(seed, block_start, ids[block_start:].tolist(), cfg, temperature)

    return model


def reference_decode(prompt: Sequence[int], seed: int, cfg: SimConfig, model: SimModel | None = None) -> Trajectory:
    """Independent reference: decode one sequence block by block with our own unmasking rules (sampling.py); the
    log-prob of a token is the torch engine's at ``cfg.temperature`` (``shared.model.sampling.sampling_log_probs``)."""
    with _one_thread():
        return _reference_decode(prompt, seed, cfg, model or fake_model(cfg))


def _reference_decode(prompt: Sequence[int], seed: int, cfg: SimConfig, model: SimModel) -> Trajectory:
    import torch

    from services.rollout.engines.sampling import select_unmask, strategy_codes
    from shared.contracts.wire import Strategy
    from shared.model.sampling import sampling_log_probs

    no_filter = (torch.full((1,), cfg.temperature), torch.zeros(1, dtype=torch.long), torch.ones(1))  # no top-k/p

    b, mask = cfg.block_size, cfg.mask_token_id
    code = strategy_codes([Strategy(cfg.strategy)])
    threshold = torch.tensor([cfg.threshold])
    per_step = torch.tensor([max(1, b // (cfg.denoising_steps or b))])
    full = len(prompt) // b * b
    tail = list(prompt[full:])
    seq = list(prompt[:full])
    tokens: list[int] = []
    steps: list[int] = []
    logps: list[float] = []
    counter, start = 0, full
    while True:
        cur = tail + [mask] * (b - len(tail))
        block_steps, block_logps = [0] * b, [0.0] * b
        masked = torch.tensor([[i >= len(tail) for i in range(b)]])
        while bool(masked.any()):
            ids = np.asarray(seq + cur, dtype=np.int64)
            logits, sampled = model(seed, ids, masked[0].numpy(), start, len(prompt), cfg.temperature)
            tok = torch.as_tensor(sampled)[:, None]
            conf = (logits / cfg.temperature).softmax(-1).gather(-1, tok).squeeze(-1)
            lp = sampling_log_probs(logits[None], *no_filter)[0].gather(-1, tok).squeeze(-1)
            sel = select_unmask(conf[None], masked, code, threshold, per_step)[0]
            counter += 1
            for i in sel.nonzero().squeeze(1).tolist():
                cur[i], block_steps[i], block_logps[i] = int(sampled[i]), counter, float(lp[i])
            masked &= ~sel[None]
        seq += cur
        tokens += cur[len(tail) :]
        steps += block_steps[len(tail) :]
        logps += block_logps[len(tail) :]
        tail, start = [], start + b
        length, reason = cut_response(tokens, cfg.max_new_tokens, list(cfg.stop_token_ids))
        if reason:
            return Trajectory(
                tokens[:length], steps[:length], tokens[length:], steps[length:], reason, logps[:length], logps[length:]
            )


def same_trajectory(a: Trajectory, b: Trajectory, logprob_tol: float = 1e-5) -> bool:
    """Equal token ids, steps, tails and finish reason, and log-probs within ``logprob_tol`` (NaN matches nothing)."""
    exact = (a.token_ids, a.step_map, a.tail_ids, a.tail_steps, a.finish_reason)
    if exact != (b.token_ids, b.step_map, b.tail_ids, b.tail_steps, b.finish_reason):
        return False
    pairs = list(zip(a.logprobs + a.tail_logprobs, b.logprobs + b.tail_logprobs, strict=False))
    if len(pairs) != len(a.logprobs) + len(a.tail_logprobs) or len(a.logprobs) != len(b.logprobs):
        return False
    return all(math.isclose(x, y, rel_tol=0.0, abs_tol=logprob_tol) for x, y in pairs)


@dataclass
class SimResult:
    records: dict[int, StepRecord]
    forwards: int = 0
    prefills: int = 0
    re_prefills: int = 0
    preemptions: int = 0
    evictions: int = 0


class Sim:
    """Drives LMDeploy's real scheduler-side classes through prefill, decode, preemption/re-prefill and stop.

    Real: `Scheduler` (paging, admission, eviction), `SchedulerSequenceDLLM` (patched), `DLLMSequenceStrategy.
    update_running`, `DLLMModelAgentStrategy` (extra inputs, slicing, `post_sampling` -> `UnmaskingProcessor`,
    stopping criteria), `DLLMSamplingStrategy.make_sampling_inputs` (stop words), `step_inputs._update_dllm`.
    Replaced: the model forward and the sampler (:func:`fake_forward`). After every forward the scheduler's
    view of each running sequence is checked against the device-side state `_update_dllm` computes.
    """

    def __init__(self, cfg: SimConfig, rng_seed: int, model: SimModel | None = None) -> None:
        from lmdeploy.pytorch.config import CacheConfig, DLLMConfig, SchedulerConfig, UnmaskingStrategy
        from lmdeploy.pytorch.messages import SequenceMeta
        from lmdeploy.pytorch.paging.scheduler import Scheduler
        from lmdeploy.pytorch.strategies.dllm.engine import DLLMEngineStrategy
        from lmdeploy.pytorch.strategies.dllm.model_agent import DLLMModelAgentStrategy
        from lmdeploy.pytorch.strategies.dllm.sampling import DLLMSamplingStrategy
        from lmdeploy.pytorch.strategies.dllm.sequence import DLLMSequenceStrategy

        self.cfg, b = cfg, cfg.block_size
        self.model = model or fake_model(cfg)
        from lmdeploy.pytorch import consts

        self.masked_code = consts.DLLM_MASKED
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
        self.prompt_len: dict[int, int] = {}
        self.index: dict[int, int] = {}  # session id -> request index
        self.device: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # seq id -> (ids, mask) the device holds next
        self.running: list[Any] = []
        self.seen_history: dict[int, int] = {}  # seq id -> the most history it ever had (eviction detection)

    def add(self, index: int, sid: int, prompt: Sequence[int], seed: int) -> None:
        from lmdeploy.pytorch.messages import SamplingParam

        session = self.sched.add_session(sid)
        param = SamplingParam(max_new_tokens=self.cfg.max_new_tokens, stop_words=list(self.cfg.stop_token_ids))
        session.add_sequence(np.asarray(prompt, dtype=np.int64), sampling_param=param)
        self.seeds[sid], self.index[sid], self.prompt_len[sid] = seed, index, len(prompt)

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
        for s, ids_, m in zip(seqs, last.numpy(), mask_in.numpy(), strict=True):
            start = s.num_history_ids + len(s.token_ids) - b
            ids = np.concatenate([np.asarray(s.history_cache[:start], dtype=np.int64), ids_])
            masked = m == self.masked_code
            lg, tok = self.model(
                self.seeds[s.session_id], ids, masked, start, self.prompt_len[s.session_id], self.cfg.temperature
            )
            # LMDeploy's temperature processor runs before post_sampling; the sim has no processors, so it stands in
            logits.append(lg / self.cfg.temperature)
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
                publish_record(rec)
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
    model: SimModel | None = None,
) -> SimResult:
    """Decode `prompts` through LMDeploy's real scheduler classes on CPU; the recorder's output per prompt.

    Preemption happens when the KV pool (`num_gpu_blocks`) runs short, and at random with `preempt_prob`
    per decode step; preempted sequences that lose their blocks restart from `set_step(0)` and re-prefill.
    `keep_published` leaves the records in the store for a consumer that pops them by session id. `model`:
    the fake model of `cfg` by default.
    """
    apply_patch()
    with _one_thread():
        return _simulate(prompts, seeds, cfg, rng_seed, session_ids, keep_published, model)


def _simulate(prompts, seeds, cfg, rng_seed, session_ids, keep_published, model) -> SimResult:
    sim = Sim(cfg, rng_seed, model)
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
    sim = Sim(cfg, rng_seed=0)
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
    """Startup check against the installed LMDeploy: recorder == reference (step maps and log-probs) on a few
    schedules, and the layout of the sampling rows (< 1 s).

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
            if not same_trajectory(got, want):
                raise RuntimeError(f"LMDeploy step-map self-check failed ({cfg}, prompt {i}): {got} != {want}")
