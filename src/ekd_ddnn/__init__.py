"""ekd-ddnn: depth-level dynamic neural networks trained with Embedded Knowledge Distillation."""

__version__ = "0.1.0"

from pathlib import Path

# The Hydra configs live at the repository root (the package is installed editable).
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
