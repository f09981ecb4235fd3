"""The model: SDAR <-> transformers adapter, the tiny preset, block-diffusion masks, the sampling transform."""
