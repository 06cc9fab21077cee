"""Multimodal inputs: loading images and videos, processing them with the model family's
HF image processor, the radix-cache keys of their placeholder tokens, the M-RoPE
positions, and the vision-embedding cache. docs/multimodal.md describes the whole path."""
