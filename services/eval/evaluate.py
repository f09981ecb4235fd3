"""`gtpo eval`: k samples per question, scored with the reward service's own answer checking.

Reports avg@k (mean accuracy over all samples), pass@k (questions with at least one correct sample), the boxed rate
(samples with a final `\\boxed{}` answer, for code a fenced program, so a format gain can be told from a correctness
one), mean response length, tokens per denoising step and the truncation rate, as a table and as JSON. Generation
runs in-process (the torch engine) or against a running rollout service (`--rollout-url`); answers are checked with
the same extraction and math-verify pool as the reward service, so eval and reward never disagree.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shared.contracts.code_tests import extract_program, is_code_reference
from shared.contracts.wire import GenerationRequest, Rollout, SamplingParams, ScoreStatus
from shared.model.step_map import denoising_steps
from shared.prompts import MAX_PROMPT_TOKENS, PROMPT_TEMPLATE, encode_prompt

# Named benchmarks: hub datasets in the RL datasets' format ({question, ground_truth_answer}), as the GTPO and DiRL
# repositories publish them. Loading them needs network access and the `datasets` package.
PRESETS: dict[str, tuple[str, str]] = {
    "MATH500": ("Auraithm/MATH500", "test"),
    "GSM8K": ("Auraithm/GSM8K", "test"),
    "AIME2024": ("Auraithm/AIME2024", "test"),
    "AIME2025": ("Auraithm/AIME2025", "test"),
    "OlympiadBench": ("Auraithm/OlympiadBench", "test"),
}


@dataclass
class EvalResult:
    questions: int
    k: int
    avg_at_k: float
    pass_at_k: float
    boxed_rate: float
    mean_length: float
    tokens_per_step: float
    truncation_rate: float
    reward_errors: int
    avg_at_k_ci: list[float] | None = None
    """95% bootstrap interval over questions (None in records written before intervals existed)."""
    pass_at_k_ci: list[float] | None = None

    def row(self) -> dict[str, float]:
        return asdict(self)


def load_rows(dataset: str, **columns) -> list[dict]:
    """Rows `{question, ground_truth_answer}` of a data source (shared/data.py: a JSON / JSONL file, a `datasets`
    save_to_disk folder, hf:org/name[:config][:split]) or a named preset (hub); a split left out is `test`.

    Args:
        columns: question_field, answer_field, answer_extract (see `shared.data.map_columns`), code_format (a code
            dataset: `shared.code_data`; the code presets set it).
    """
    from services.eval.code import CODE_PRESETS
    from shared.data import HUB_PREFIX, load_qa

    source = dataset
    if dataset in CODE_PRESETS and not Path(dataset).exists():
        source, columns["code_format"] = f"{HUB_PREFIX}{CODE_PRESETS[dataset][0]}", CODE_PRESETS[dataset][1]
    elif dataset in PRESETS and not Path(dataset).exists():
        name, split = PRESETS[dataset]
        source = f"{HUB_PREFIX}{name}::{split}"
    elif not dataset.startswith(HUB_PREFIX) and not Path(dataset.rpartition(":")[0] or dataset).exists():
        raise ValueError(
            f"dataset: {dataset} is neither a file nor a preset ({', '.join([*PRESETS, *CODE_PRESETS])}), a datasets "
            "folder or hf:org/name"
        )
    return load_qa(source, default_split="test", **columns)


def check_prompts(prompts: list[list[int]], max_prompt_tokens: int, field: str = "question") -> None:
    """Refuse a prompt over `max_prompt_tokens` (it would exhaust memory in the engine), naming its row (1-based)
    and the column it came from.

    >>> check_prompts([[1, 2], [1, 2, 3]], 2, "problem")
    Traceback (most recent call last):
    ...
    ValueError: dataset row 2: column 'problem' makes a prompt of 3 tokens, over max_prompt_tokens=2
    """
    for i, p in enumerate(prompts, start=1):
        if len(p) > max_prompt_tokens:
            raise ValueError(
                f"dataset row {i}: column {field!r} makes a prompt of {len(p)} tokens, over max_prompt_tokens="
                f"{max_prompt_tokens}"
            )


def generate_local(engine, prompts: list[list[int]], params: SamplingParams) -> list[list[Rollout]]:
    return engine.generate([GenerationRequest(prompt_ids=p, params=params) for p in prompts])


def generate_remote(url: str, prompts: list[list[int]], params: SamplingParams, chunk: int = 32) -> list[list[Rollout]]:
    """Through a running rollout service's `POST /v1/generate`."""
    import httpx

    from shared.contracts.wire import GenerateRequest, GenerateResponse

    out: list[list[Rollout]] = []
    with httpx.Client(timeout=httpx.Timeout(600, connect=10)) as client:
        for i in range(0, len(prompts), chunk):
            req = GenerateRequest(prompt_ids=prompts[i : i + chunk], params=params)
            r = client.post(f"{url.rstrip('/')}/v1/generate", content=req.model_dump_json(),
                            headers={"content-type": "application/json"})  # fmt: skip
            r.raise_for_status()
            out += GenerateResponse.model_validate(r.json()).rollouts
    return out


@dataclass
class Generated:
    """Rollouts of one decoding and what producing them cost: wall seconds, returned tokens and, on an in-process
    engine, its (batched) model forwards."""

    groups: list[list[Rollout]]
    seconds: float
    tokens: int
    forwards: int | None


def timed_generate(engine, prompts: list[list[int]], params: SamplingParams) -> Generated:
    """`generate_local` with the engine's own forward counter read around it."""
    before = engine.stats.forwards if hasattr(engine, "stats") else None
    t0 = time.perf_counter()
    groups = generate_local(engine, prompts, params)
    seconds = time.perf_counter() - t0
    forwards = None if before is None else engine.stats.forwards - before
    return Generated(groups, seconds, sum(len(r.token_ids) for g in groups for r in g), forwards)


def score_questions(rows: list[dict], groups: list[list[Rollout]], pool) -> tuple[list, int]:
    """Every sample checked (its last `\\boxed{}` against the reference, with the reward service's scoring).

    Returns:
        (one `QuestionResult` per row, reward errors).
    """
    from services.eval.card import QuestionResult, SampleResult, sha256_text, sha256_tokens
    from services.reward.scoring import item_from_rollout

    items = [item_from_rollout(f"{qi}:{si}", r, str(row["ground_truth_answer"]))
             for qi, (row, group) in enumerate(zip(rows, groups, strict=True)) for si, r in enumerate(group)]  # fmt: skip
    reward = "code" if items and is_code_reference(items[0].reference) else "accuracy"
    results = iter(_score(items, reward, pool) if items else [])
    out, errors = [], 0
    for qi, (row, group) in enumerate(zip(rows, groups, strict=True)):
        samples = []
        for r in group:
            res = next(results)
            errors += res.status != ScoreStatus.ok
            samples.append(SampleResult(
                seed=r.seed, correct=res.status == ScoreStatus.ok and res.components.get(reward, 0.0) == 1.0,
                boxed=answer_in_format(r.text, reward), length=len(r.token_ids),
                steps=denoising_steps(r.step_map), finish_reason=r.finish_reason,
                tokens_sha256=sha256_tokens(r.token_ids), text=r.text[:2000],
            ))  # fmt: skip
        out.append(QuestionResult(index=qi, question_sha256=sha256_text(str(row["question"])), samples=samples))
    return out, errors


def answer_in_format(text: str, reward: str) -> bool:
    """The format half of a sample (`boxed_rate`): a non-empty final `\\boxed{}` for maths, a fenced program for code
    (the reward service finds no program, and scores 0, without one)."""
    from services.reward.rewards import extract_last_boxed

    if reward == "code":
        return extract_program(text) is not None
    return bool((extract_last_boxed(text) or "").strip())


def _score(items: list, reward: str, pool) -> list:
    """Maths through the verifier pool; code through a sandbox pool of its own (correct = every test passes)."""
    from services.reward.code import CodeRunner
    from services.reward.scoring import score_items

    if reward != "code":
        return score_items(items, {"accuracy": 1.0}, pool)
    runner = CodeRunner()
    try:
        return score_items(items, {"code": 1.0}, pool, code=runner)
    finally:
        runner.close()


def score(rows: list[dict], groups: list[list[Rollout]], pool) -> EvalResult:
    """Check every sample's last `\\boxed{}` against the reference with the reward service's scoring."""
    questions, errors = score_questions(rows, groups, pool)
    return result_of(questions, errors)


def result_of(questions: list, errors: int) -> EvalResult:
    from services.eval.card import per_question_metrics

    m, ci = per_question_metrics(questions)
    return EvalResult(
        questions=len(questions), k=len(questions[0].samples) if questions else 0,
        avg_at_k=m["avg_at_k"], pass_at_k=m["pass_at_k"], boxed_rate=m["boxed_rate"], mean_length=m["mean_length"],
        tokens_per_step=m["tokens_per_step"], truncation_rate=m["truncation_rate"], reward_errors=errors,
        avg_at_k_ci=ci["avg_at_k"], pass_at_k_ci=ci["pass_at_k"],
    )  # fmt: skip


def speed_metrics(questions: list, gen: Generated) -> dict[str, float | None]:
    """Tokens per forward (the papers' TPF: response tokens over the denoising forwards that made them, summed over
    samples), AUP at this one operating point, wall-clock tokens/s, and the engine's batched forwards per token."""
    from services.eval.metrics import aup

    samples = [s for q in questions for s in q.samples]
    tokens, steps = sum(s.length for s in samples), sum(s.steps for s in samples)
    tpf = tokens / steps if steps else 0.0
    acc = 100.0 * (sum(s.correct for s in samples) / len(samples) if samples else 0.0)
    return {
        "tokens_per_forward": tpf,
        "aup": aup([(tpf, acc)]) if tpf > 0 else 0.0,
        "tokens_per_second": gen.tokens / gen.seconds if gen.seconds > 0 else None,
        "engine_forwards_per_token": None if gen.forwards is None or not gen.tokens else gen.forwards / gen.tokens,
    }


def evaluate(
    model: str | Path | None,
    rows: list[dict],
    *,
    k: int = 4,
    params: SamplingParams | None = None,
    template: str = PROMPT_TEMPLATE,
    chat: bool = True,
    rollout_url: str | None = None,
    seed: int = 0,
    pool=None,
    card_path: Path | None = None,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
    question_field: str = "question",
) -> EvalResult:
    """Generate k samples per question (in-process unless `rollout_url`) and score them; a prompt over
    `max_prompt_tokens` is refused first, naming its row and `question_field`; with `card_path`, also write the eval
    card there."""
    from services.eval.protocols import custom

    cards = evaluate_cards(model, rows, custom(k, params or SamplingParams(max_new_tokens=512)), template=template,
                           chat=chat, rollout_url=rollout_url, seed=seed, pool=pool,
                           max_prompt_tokens=max_prompt_tokens, question_field=question_field)  # fmt: skip
    if card_path is not None:
        cards[0].card.write(card_path)
    return cards[0].result


@dataclass
class CardRun:
    """One evaluated (engine, decoding): its card and the plain result table."""

    engine: str
    card: object  # services.eval.card.EvalCard
    result: EvalResult


def _torch_engine(model: str | Path, torch_engine):
    return torch_engine


def _reference_engine(model: str | Path, torch_engine):
    from services.rollout.engines.reference import NaiveEngine

    return NaiveEngine(torch_engine._loaded)


def _lmdeploy_engine(model: str | Path, torch_engine):
    from services.rollout.engines import create_engine

    return create_engine("lmdeploy", model)


ENGINES: dict[str, Callable[[str | Path, Any], Any]] = {
    "torch": _torch_engine, "reference": _reference_engine, "lmdeploy": _lmdeploy_engine,
}  # fmt: skip
"""In-process engines `--engines` accepts, by name -> builder(checkpoint, the torch engine loaded for its tokenizer):
the KV-cached torch engine, the naive recompute decoder (services/rollout/engines/reference.py: no KV cache, one
request at a time; the CPU parity baseline of issue 27) and (GPU, the `lmdeploy` extra) LMDeploy."""


def _engines(model, rollout_url: str | None, engines: tuple[str, ...]) -> tuple[dict[str, object], object]:
    """The in-process engines to evaluate by name (none with `rollout_url`: the service's engine) and the tokenizer.

    Raises:
        ValueError: no model and no URL, an unknown engine name, or a remote eval without the checkpoint.
    """
    from shared.model.sdar import load_tokenizer

    if model is None and rollout_url is None:
        raise ValueError("model: give a checkpoint directory or a rollout service URL")
    bad = [e for e in engines if e not in ENGINES]
    if bad or not engines:
        raise ValueError(f"engines: a comma-separated list of {', '.join(ENGINES)}, got {','.join(engines)!r}")
    if rollout_url is not None:
        tok = load_tokenizer(model) if model is not None else None
        if tok is None:
            raise ValueError("model: remote eval still needs the checkpoint directory for its tokenizer")
        return {}, tok
    from services.rollout.engines.torch_engine import TorchEngine

    torch_engine = TorchEngine.from_pretrained(model, max_batch_size=64)
    return {name: ENGINES[name](model, torch_engine) for name in engines}, torch_engine.tokenizer


def evaluate_cards(
    model: str | Path | None,
    rows: list[dict],
    protocol,
    *,
    template: str = PROMPT_TEMPLATE,
    chat: bool = True,
    rollout_url: str | None = None,
    seed: int = 0,
    engines: tuple[str, ...] = ("torch",),
    dataset: str = "",
    extra_settings: dict | None = None,
    pool=None,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
    question_field: str = "question",
) -> list[CardRun]:
    """Every decoding of `protocol` on every engine, same prompts and seeds: one card each, in (engine, decoding)
    order.

    Args:
        protocol: a `services.eval.protocols.Protocol` (settings already overridden by explicit flags).
        engines: in-process engine names (ENGINES); ignored with `rollout_url` (the service's engine).
        dataset: the data source as given (recorded, and hashed when it is a file).
        extra_settings: further settings to record (answer columns, limit).
        max_prompt_tokens: a longer prompt is refused before any generation, naming its row and `question_field`.
    """
    from services.reward.verify import VerifierPool

    built, tok = _engines(model, rollout_url, engines)
    prompts = [encode_prompt(tok, template.format(question=r["question"]), chat=chat) for r in rows]
    check_prompts(prompts, max_prompt_tokens, question_field)
    own_pool = pool is None
    pool = pool or VerifierPool(workers=2, timeout_s=5.0)
    out: list[CardRun] = []
    try:
        for name in built or {"remote": None}:
            for dec in protocol.decodings:
                params = dec.params.model_copy(update={"n": protocol.k, "seed": seed})
                if rollout_url is not None:
                    t0 = time.perf_counter()
                    groups = generate_remote(rollout_url, prompts, params)
                    toks = sum(len(r.token_ids) for g in groups for r in g)
                    gen = Generated(groups, time.perf_counter() - t0, toks, None)
                else:
                    gen = timed_generate(built[name], prompts, params)
                questions, errors = score_questions(rows, gen.groups, pool)
                card = build_card(protocol, dec.name, params, questions, gen, model=model, engine=name,
                                  rollout_url=rollout_url, rows=rows, dataset=dataset, template=template, chat=chat,
                                  seed=seed, extra=extra_settings or {})  # fmt: skip
                out.append(CardRun(name, card, result_of(questions, errors)))
    finally:
        if own_pool:
            pool.close()
    return out


def engine_info(name: str, rollout_url: str | None) -> dict:
    """The engine and the versions its numbers depend on."""
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    info: dict = {"name": name, "gtpo": version("gtpo"), "torch": version("torch"),
                  "transformers": version("transformers")}  # fmt: skip
    if rollout_url is not None:
        info.update(name="rollout-service", url=rollout_url)
    else:
        import torch

        info["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return info


def build_card(protocol, decoding: str, params: SamplingParams, questions: list, gen: Generated, *, model, engine: str,
               rollout_url, rows, dataset: str, template: str, chat: bool, seed: int, extra: dict):  # fmt: skip
    """The eval card of one decoding (services/eval/card.py)."""
    import datetime

    from services.eval.card import EvalCard, file_sha256, per_question_metrics, rows_sha256, weights_sha256

    metrics, intervals = per_question_metrics(questions)
    speed = speed_metrics(questions, gen)
    data_file = Path(dataset) if dataset and Path(dataset).is_file() else None
    return EvalCard(
        protocol=protocol.name, decoding=decoding,
        settings={"k": protocol.k, "seed": seed, "params": params.model_dump(mode="json"), "template": template,
                  "chat": chat, **extra},
        engine=engine_info(engine, rollout_url),
        model={"path": str(model) if model is not None else None,
               "weight_sha256": weights_sha256(Path(model)) if model is not None and rollout_url is None else None},
        data={"source": dataset, "file_sha256": file_sha256(data_file) if data_file else None,
              "rows_sha256": rows_sha256(rows), "questions": len(rows)},
        questions=questions, metrics={**metrics, **speed}, intervals=intervals,
        timing={"seconds": gen.seconds, "tokens": gen.tokens, "forwards": gen.forwards},
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )  # fmt: skip
