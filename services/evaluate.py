"""`gtpo eval`: k samples per question, scored with the reward service's own answer checking.

Reports avg@k (mean accuracy over all samples), pass@k (questions with at least one correct sample), the boxed rate
(samples with a final `\\boxed{}` answer, so a format gain can be told from an arithmetic one), mean response
length, tokens per denoising step and the truncation rate, as a table and as JSON. Generation runs in-process (the
torch engine) or against a running rollout service (`--rollout-url`); answers are checked with the same extraction
and math-verify pool as the reward service, so eval and reward never disagree.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from shared.contracts import GenerationRequest, Rollout, SamplingParams, ScoreStatus
from shared.prompts import MAX_PROMPT_TOKENS, PROMPT_TEMPLATE, encode_prompt, tokens_per_step

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

    def row(self) -> dict[str, float]:
        return asdict(self)


def load_rows(dataset: str, **columns) -> list[dict]:
    """Rows `{question, ground_truth_answer}` of a data source (shared/data.py: a JSON / JSONL file, a `datasets`
    save_to_disk folder, hf:org/name[:config][:split]) or a named preset (hub); a split left out is `test`.

    Args:
        columns: question_field, answer_field, answer_extract (see `shared.data.map_columns`).
    """
    from shared.data import HUB_PREFIX, load_qa

    source = dataset
    if dataset in PRESETS and not Path(dataset).exists():
        name, split = PRESETS[dataset]
        source = f"{HUB_PREFIX}{name}::{split}"
    elif not dataset.startswith(HUB_PREFIX) and not Path(dataset.rpartition(":")[0] or dataset).exists():
        raise ValueError(
            f"dataset: {dataset} is neither a file nor a preset ({', '.join(PRESETS)}), a datasets folder or hf:org/name"
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

    from shared.contracts import GenerateRequest, GenerateResponse

    out: list[list[Rollout]] = []
    with httpx.Client(timeout=httpx.Timeout(600, connect=10)) as client:
        for i in range(0, len(prompts), chunk):
            req = GenerateRequest(prompt_ids=prompts[i : i + chunk], params=params)
            r = client.post(f"{url.rstrip('/')}/v1/generate", content=req.model_dump_json(),
                            headers={"content-type": "application/json"})  # fmt: skip
            r.raise_for_status()
            out += GenerateResponse.model_validate(r.json()).rollouts
    return out


def score(rows: list[dict], groups: list[list[Rollout]], pool) -> EvalResult:
    """Check every sample's last `\\boxed{}` against the reference with the reward service's scoring."""
    from services.reward.rewards import extract_last_boxed
    from services.reward.scoring import item_from_rollout, score_items

    items, owner = [], []
    for qi, (row, group) in enumerate(zip(rows, groups, strict=True)):
        for si, r in enumerate(group):
            items.append(item_from_rollout(f"{qi}:{si}", r, str(row["ground_truth_answer"])))
            owner.append(qi)
    results = score_items(items, {"accuracy": 1.0}, pool)
    correct = [res.status == ScoreStatus.ok and res.components.get("accuracy", 0.0) == 1.0 for res in results]
    flat = [r for g in groups for r in g]
    per_q: dict[int, bool] = {}
    for q, c in zip(owner, correct, strict=True):
        per_q[q] = per_q.get(q, False) or c
    k = len(groups[0]) if groups else 0
    return EvalResult(
        questions=len(rows), k=k,
        avg_at_k=sum(correct) / max(1, len(correct)),
        pass_at_k=sum(per_q.values()) / max(1, len(rows)),
        boxed_rate=sum(bool((extract_last_boxed(r.text) or "").strip()) for r in flat) / max(1, len(flat)),
        mean_length=statistics.fmean(len(r.token_ids) for r in flat) if flat else 0.0,
        tokens_per_step=statistics.fmean(tokens_per_step(len(r.token_ids), r.step_map) for r in flat) if flat else 0.0,
        truncation_rate=sum(r.finish_reason == "length" for r in flat) / max(1, len(flat)),
        reward_errors=sum(res.status != ScoreStatus.ok for res in results),
    )  # fmt: skip


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
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
    question_field: str = "question",
) -> EvalResult:
    """Generate k samples per question (in-process unless `rollout_url`) and score them; a prompt over
    `max_prompt_tokens` is refused first, naming its row and `question_field`."""
    from services.reward.verify import VerifierPool
    from shared.model import load_tokenizer

    if model is None and rollout_url is None:
        raise ValueError("model: give a checkpoint directory or a rollout service URL")
    base = params or SamplingParams(max_new_tokens=512)
    params = base.model_copy(update={"n": k, "seed": seed})
    if rollout_url is not None:
        tok = load_tokenizer(model) if model is not None else None
        if tok is None:
            raise ValueError("model: remote eval still needs the checkpoint directory for its tokenizer")
        prompts = [encode_prompt(tok, template.format(question=r["question"]), chat=chat) for r in rows]
        check_prompts(prompts, max_prompt_tokens, question_field)
        groups = generate_remote(rollout_url, prompts, params)
    else:
        from services.rollout.engines.torch_engine import TorchEngine

        engine = TorchEngine.from_pretrained(model, max_batch_size=64)
        prompts = [encode_prompt(engine.tokenizer, template.format(question=r["question"]), chat=chat) for r in rows]
        check_prompts(prompts, max_prompt_tokens, question_field)
        groups = generate_local(engine, prompts, params)
    own_pool = pool is None
    pool = pool or VerifierPool(workers=2, timeout_s=5.0)
    try:
        return score(rows, groups, pool)
    finally:
        if own_pool:
            pool.close()
