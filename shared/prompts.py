"""Prompt text -> token ids: one definition for the CLI, the services, SFT and evaluation (they must agree, or the
trainer trains on prompts the engines never see). What a step map says is shared/model/step_map.py."""

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
