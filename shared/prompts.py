"""Prompt text -> token ids, and what a rollout's step map says: one definition for the CLI, the services, SFT and
evaluation (they must agree, or the trainer trains on prompts the engines never see)."""

from __future__ import annotations

from collections.abc import Sequence

PROMPT_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within $\\boxed{{}}$."
"""The user message of the RL recipe (DiRL / TraceRL); ``{question}`` is replaced."""
MAX_PROMPT_TOKENS = 8192
"""The longest prompt (template and chat markup included) the rollout service and `gtpo eval` take by default."""


def encode_prompt(tokenizer, prompt: str | Sequence[dict[str, str]], *, chat: bool) -> list[int]:
    """The token ids a model is prompted with.

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompt: the user message, or a chat as ``[{role, content}, ...]``.
        chat: wrap in the tokenizer's chat template with the assistant header (``add_generation_prompt``);
            without it, the plain text of the (last) message, with no special tokens added, so that the ids are
            the text's own and a block-diffusion prompt never starts with a BOS the engines would not add.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if not messages:
        raise ValueError("prompt: needs at least one message")
    if chat:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        # transformers 5 returns a BatchEncoding, 4.x a plain list
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    return list(tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"])


def denoising_steps(step_map: Sequence[int]) -> int:
    """Forwards that unmasked at least one response token: the distinct values of the step map (DiRL's speed
    denominator). The tail after a stop is not counted.

    >>> denoising_steps([1, 1, 2, 3, 3, 3])
    3
    """
    return len(set(step_map))


def tokens_per_step(token_count: int, step_map: Sequence[int]) -> float:
    """Response tokens per denoising forward (1.0 for one token a step; higher is faster).

    >>> tokens_per_step(6, [1, 1, 2, 3, 3, 3])
    2.0
    """
    return token_count / max(1, denoising_steps(step_map))
