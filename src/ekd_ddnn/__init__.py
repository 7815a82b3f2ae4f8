"""ekd-ddnn: depth-level dynamic neural networks trained with Embedded Knowledge Distillation."""

__version__ = "0.1.0"
