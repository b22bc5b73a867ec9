"""Inference: KV-cached contexts, the flow-matching sampler with CFG, text decoding, the public pipeline."""
