"""SFT data and objectives: SDAR's random masking and trace-SFT from step maps (docs/design.md section 3).

Random masking (SDAR): per response a mask rate t ~ U(eps, 1); each response token is masked with probability t
(at least one); the loss is the log-loss at masked positions weighted 1/t, normalised by the response tokens of
the batch. The response ends with the end token and the rest of its last block is filled with the end token,
maskable and trained: left as clean padding it would tell the model the answer's length, which it does not know at
decode time (docs/design.md section 3).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from services.trainer.learner.trainer import WorkItem
from services.trainer.learner.trajectory import Round, Trajectory, rollout_trajectory
from shared.contracts.wire import Rollout
from shared.data import DataError, read_rows
from shared.prompts import encode_prompt


def turn_end_id(tokenizer) -> int:
    """The token that ends an assistant turn: `<|im_end|>` where the tokenizer has it, else eos."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return im_end if isinstance(im_end, int) and im_end != tokenizer.unk_token_id else tokenizer.eos_token_id


def encode_example(row: dict[str, Any], tokenizer, chat: bool, where: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids ending with the turn end) of a `{prompt, response}` or `{messages}` row."""
    if "messages" in row:
        msgs = row["messages"]
        if (not isinstance(msgs, list) or len(msgs) < 2 or not all(isinstance(m, dict) for m in msgs)
                or msgs[-1].get("role") != "assistant"):  # fmt: skip
            raise DataError(f"{where}: messages must be a list ending with an assistant message")
        prompt_msgs, response = msgs[:-1], msgs[-1].get("content")
    elif "prompt" in row and "response" in row:
        prompt_msgs, response = [{"role": "user", "content": row["prompt"]}], row["response"]
    else:
        raise DataError(f"{where}: needs 'prompt' and 'response', or 'messages' (got keys {sorted(row)})")
    if not isinstance(response, str) or not all(isinstance(m.get("content"), str) for m in prompt_msgs):
        raise DataError(f"{where}: prompt/response contents must be strings")
    prompt_ids = encode_prompt(tokenizer, prompt_msgs, chat=chat)
    end = turn_end_id(tokenizer) if chat else tokenizer.eos_token_id
    return prompt_ids, tokenizer(response, add_special_tokens=False)["input_ids"] + [end]


def sft_columns(row: dict[str, Any], prompt_field: str, response_field: str, where: str) -> dict[str, Any]:
    """A `{prompt_field, response_field}` row as `{prompt, response}` (messages and rollout rows as they are).

    >>> sft_columns({"problem": "1+1", "solution": "2"}, "problem", "solution", "x")
    {'prompt': '1+1', 'response': '2'}
    """
    if "messages" in row or "step_map" in row or (prompt_field, response_field) == ("prompt", "response"):
        return row
    if prompt_field in row and response_field in row:
        return {"prompt": row[prompt_field], "response": row[response_field]}
    missing = prompt_field if prompt_field not in row else response_field
    what = "prompt_field" if missing == prompt_field else "response_field"
    raise DataError(f"{where}: no column {missing!r} ({what}); the row has {', '.join(map(str, row))}")


def pad_to_block(prompt_len: int, response_ids: list[int], block_size: int, end_id: int) -> list[int]:
    """Fill the response's last block with the end token.

    >>> pad_to_block(3, [7, 8], 4, 0)
    [7, 8, 0, 0, 0]
    """
    total = prompt_len + len(response_ids)
    return response_ids + [end_id] * ((-total) % block_size)


def random_mask_item(
    prompt_ids: list[int], response_ids: list[int], block_size: int, gen: torch.Generator, eps: float = 1e-3
) -> WorkItem:
    """One SDAR random-masking sample: mask rate t ~ U(eps, 1), each response token masked with probability t."""
    p, n = len(prompt_ids), len(response_ids)
    t = eps + (1 - eps) * float(torch.rand((), generator=gen))
    masked_resp = torch.rand(n, generator=gen) < t
    if not bool(masked_resp.any()):  # at least one target, as SDAR does
        masked_resp[int(torch.randint(n, (), generator=gen))] = True
    clean = torch.tensor(prompt_ids + response_ids, dtype=torch.long)
    masked = torch.zeros(p + n, dtype=torch.bool)
    masked[p:] = masked_resp
    blocks = torch.unique(masked.nonzero().squeeze(1) // block_size)
    traj = Trajectory(clean, p, n, block_size, [Round(masked, masked.clone(), blocks)])
    return WorkItem(traj, token_scale=1.0 / t)


def trace_item(row: dict[str, Any], shrink: int, where: str) -> WorkItem:
    """Trace-SFT: the rounds of a recorded trajectory (a rollout JSON row), each token its own round's target."""
    try:
        rollout = Rollout.model_validate(row)
    except ValueError as e:
        raise DataError(f"{where}: not a valid rollout: {e}") from e
    return WorkItem(rollout_trajectory(rollout, shrink))


def batch_indices(n_rows: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The rows of SFT step `step` (0-based): epochs of seeded permutations, a pure function of the step."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, n_rows)
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(perm[pos]))
    return out


def prepare_rows(cfg, tokenizer, block_size: int) -> list[tuple[list[int], list[int]] | dict[str, Any]]:
    """Tokenise every row once: (prompt ids, block-padded response ids), or the raw row for trace rows."""
    rows = read_rows(cfg.data, max_row_bytes=cfg.max_row_bytes)
    end = tokenizer.eos_token_id
    out: list[tuple[list[int], list[int]] | dict[str, Any]] = []
    dropped = 0
    for n, row in enumerate(rows, start=1):
        where = f"{cfg.data}:{n}"
        row = sft_columns(row, cfg.prompt_field, cfg.response_field, where)
        if "step_map" in row:
            trace_item(row, cfg.shrink, where)  # validate now, not mid-run
            out.append(row)
            continue
        prompt, response = encode_example(row, tokenizer, cfg.chat_template, where)
        response = pad_to_block(len(prompt), response, block_size, end)
        if len(prompt) + len(response) > cfg.max_tokens:
            dropped += 1
            continue
        out.append((prompt, response))
    if not out:
        raise DataError(f"{cfg.data}: every row is longer than max_tokens={cfg.max_tokens}")
    if dropped:
        logging.getLogger("gtpo.sft").warning(
            "%s: %d rows longer than max_tokens=%d skipped", cfg.data, dropped, cfg.max_tokens
        )
    return out


def build_items(rows, indices: list[int], cfg, block_size: int, gen: torch.Generator) -> list[WorkItem]:
    items = []
    for i in indices:
        row = rows[i]
        if isinstance(row, dict):
            items.append(trace_item(row, cfg.shrink, f"{cfg.data} row {i + 1}"))
        else:
            items.append(random_mask_item(row[0], row[1], block_size, gen, cfg.sft_mask_eps))
    return items


def run_sft(cfg, *, resume: bool = False, fresh: bool = False, progress: bool = True) -> list[dict[str, float]]:
    """Train `cfg.steps` SFT steps (continuing from the latest checkpoint with `resume`; with `fresh`, from step 0
    with an earlier run's files moved aside); returns the metrics."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from services.trainer.learner.tracking import Trackers
    from services.trainer.learner.trainer import Learner, step_generator

    if resume and fresh:
        raise ValueError("--resume and --fresh: choose one (continue the run, or start it again at step 0)")
    trainer = Learner(cfg)
    if fresh:
        trainer.start_fresh()
    if resume:
        trainer.resume()
    trackers = Trackers(cfg)
    block = trainer.loaded.spec.block_size
    rows = prepare_rows(cfg, trainer.loaded.tokenizer, block)
    history = []
    columns = (TextColumn("sft"), BarColumn(), TextColumn("{task.completed}/{task.total} {task.fields[info]}"))
    show = progress and trainer.accelerator.is_main_process
    with Progress(*columns, TimeRemainingColumn(), disable=not show) as bar:
        task = bar.add_task("sft", total=cfg.steps, completed=trainer.state.step, info="")
        while trainer.state.step < cfg.steps:
            step = trainer.state.step
            # every rank builds the whole batch with the same draws, then trains its shard
            items = build_items(rows, batch_indices(len(rows), cfg.batch_size, step, cfg.seed), cfg, block,
                                step_generator(cfg.seed, step, 0))  # fmt: skip
            m = trainer.sft_step(items)
            trackers.log(m)
            trainer.state.data_cursor = (step + 1) * cfg.batch_size
            history.append(m)
            bar.update(task, advance=1, info=f"loss {m['loss']:.4f}")
            if trainer.state.step % cfg.save_every == 0 or trainer.state.step == cfg.steps:
                trainer.save()
    trackers.close()
    return history
