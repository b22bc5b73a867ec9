"""srum: fine-grained self-rewarding post-training of unified multimodal models (SRUM) on a from-scratch
BAGEL-architecture model."""

__version__ = "0.1.0"
