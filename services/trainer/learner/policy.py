"""The trained policy as one module: token log-probs at target positions of a block-diffusion layout.

Wrapping the LM in a module whose forward returns exactly what the loss needs lets Accelerate/DDP wrap it (gradient
sync hooks run through ``forward``) and keeps the LM head to the target positions only.
"""

from __future__ import annotations

from torch import Tensor, nn

from services.trainer.learner.trajectory import TrainBatch
from shared.model.masks import flex_block_mask, square_mask, to_additive
from shared.model.sampling import sampling_log_probs

FLEX_BLOCK = 128  # FlexAttention's default mask block size


class TokenLogProbs(nn.Module):
    """``forward(batch) -> (T,)`` log-probs of the labels at the batch's target positions (un-shifted logits),
    under each target's sampling settings (``shared.model.sampling.sampling_log_probs``, the engines' transform).

    A label outside the kept set of its settings (top-k / top-p under these weights) gets -inf; the loss drops
    such tokens explicitly (``objective.gtpo_loss``, docs/sampling.md)."""

    def __init__(self, lm: nn.Module, attention: str = "sdpa", checkpointing: bool = False):
        super().__init__()
        if attention not in ("sdpa", "flex"):
            raise ValueError(f"attention: must be 'sdpa' or 'flex', got {attention!r}")
        if attention == "flex":
            lm.set_attn_implementation("flex_attention")
        if checkpointing:
            # Non-reentrant: it needs no input that requires grad (frozen embeddings under LoRA would otherwise get
            # no gradient at all), passes the mask / BlockMask keyword through, and restores the RNG state before
            # recomputing, so dropout draws the same masks as the first forward. Only in train mode.
            enable = getattr(lm, "activation_checkpointing_enable", None)  # transformers >= 5.x; the old name warns
            kwargs = {"use_reentrant": False}
            if enable is not None:
                enable(kwargs)
            else:
                lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.lm = lm
        self.attention = attention

    def forward(self, batch: TrainBatch, with_hidden: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """With ``with_hidden``, also the (T, H) last hidden states at the targets (the value model's features):
        through ``forward``, so a wrapper (DDP, FSDP) runs its hooks."""
        body = self.lm.model
        if self.attention == "flex":
            # FlexAttention's Triton lowering has no kernel for some short / ragged lengths (seen on H100 with
            # torch 2.11: NoValidChoicesError at L=104); whole 128-token mask blocks always have one.
            batch = batch.pad_to(FLEX_BLOCK)
            mask = flex_block_mask(batch.position_ids, batch.copy_ids, batch.block_size, batch.valid)
        else:
            dense = square_mask(batch.position_ids, batch.copy_ids, batch.block_size, batch.valid)
            mask = to_additive(dense, body.embed_tokens.weight.dtype)
        hidden = body(
            input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask, use_cache=False
        ).last_hidden_state
        h = hidden.reshape(-1, hidden.shape[-1])[batch.target_index]  # (T, H): the LM head only where trained
        logits = self.lm.lm_head(h).float()
        logp = sampling_log_probs(logits, batch.temperature, batch.top_k, batch.top_p)
        logp = logp.gather(-1, batch.labels[:, None]).squeeze(-1)
        return (logp, h) if with_hidden else logp
