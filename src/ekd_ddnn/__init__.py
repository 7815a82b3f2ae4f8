"""ekd-ddnn: depth-level dynamic neural networks trained with Embedded Knowledge Distillation."""

__version__ = "0.1.0"

from pathlib import Path

# The Hydra configs ship inside the package (a wheel carries them).
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")


def _run_dir(resume: str | None, new_dir: str) -> str:
    """Hydra's run directory: ``new_dir``, or the run being resumed (``resume=<dir>|latest``).

    ``latest`` is the newest run beside ``new_dir`` that has ``checkpoints/last.ckpt``.
    """
    if resume is None:
        return new_dir
    if str(resume) == "latest":
        runs = sorted(Path(new_dir).parent.glob("*/checkpoints/last.ckpt"))
        return str(runs[-1].parents[1]) if runs else new_dir
    return str(resume)


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("ekd_run_dir", _run_dir, replace=True)


_register_resolvers()
