"""``python -m ekd_ddnn.export``: one depth of a checkpoint as a standalone network file.

Formats: ``state_dict`` (for the ImageNet family a plain torchvision ResNet state dict that
``torchvision.models.resnet18()`` etc. load with ``strict=True``; for the CIFAR families the
state dict of ``build_net(<arch>, blocks=<depth>)``), ``torchscript`` (traced) and ``onnx``
(``torch.onnx.export(dynamo=True)``, needs the ``onnx`` extra). Every format maps images to
logits only, with a dynamic batch dimension where the format has one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor, nn

from ekd_ddnn import CONFIG_DIR
from ekd_ddnn.errors import UserError
from ekd_ddnn.front import depth_ready
from ekd_ddnn.models import DepthDynamicNet, count_params
from ekd_ddnn.run.checkpoint import load_checkpoint, net_from_checkpoint
from ekd_ddnn.run.checks import check_integer, check_seed
from ekd_ddnn.run.cli import command, run_app
from ekd_ddnn.run.files import write_atomically

FORMATS = ("state_dict", "torchscript", "onnx")


class LogitsOnly(nn.Module):
    """Wraps a standalone DDNN depth (which returns logits and features) to return logits."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out[0] if isinstance(out, tuple) else out


def check_out(out: Path, fmt: str, *, overwrite: bool) -> None:
    """The export can be written: a known format and a file path we may (over)write."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if out.is_dir():
        raise UserError(f"out={out} is a directory; give a file path, e.g. out={out}/net.pt")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise UserError(f"{out} already exists; pass overwrite=true to replace it")
    if not out.parent.is_dir():
        raise UserError(f"cannot write {out}: directory {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {out}: {out.parent} is read-only; choose another out=")


def export_depth(
    net: DepthDynamicNet,
    depth: str | Sequence[int],
    out: str | Path,
    *,
    fmt: str = "state_dict",
    overwrite: bool = False,
) -> dict:
    """Export depth ``depth`` (a name or block counts) of ``net`` to ``out`` as ``fmt``."""
    out = Path(out)
    check_out(out, fmt, overwrite=overwrite)
    blocks = net.depth_of(depth)
    standalone = net.extract(blocks).eval()
    size = net.config["image_size"]
    example = torch.randn(2, net.config["in_channels"], size, size)
    model = LogitsOnly(standalone).eval()
    if fmt == "state_dict":
        write_atomically(out, lambda f: torch.save(standalone.state_dict(), f))
    elif fmt == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(model, example)
        write_atomically(out, lambda f: torch.jit.save(traced, f))
    else:
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise UserError(
                "ONNX export needs the onnx extra: pip install 'ekd-ddnn[onnx]'"
            ) from None
        batch = torch.export.Dim("batch", min=1)
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            dynamic_shapes=({0: batch},),
            input_names=["images"],
            output_names=["logits"],
            verbose=False,
        )
        proto = program.model_proto.SerializeToString()  # one self-contained file
        write_atomically(out, lambda f: f.write(proto))
    return {
        "name": net.name_of(blocks),
        "blocks": list(blocks),
        "params": count_params(standalone),
        "format": fmt,
        "path": str(out),
        "bytes": out.stat().st_size,
    }


def export_from_checkpoint(
    ckpt: dict, net: DepthDynamicNet, depth: Sequence[int], out: str | Path, *, cfg: DictConfig,
    fmt: str, overwrite: bool | None = None,
) -> dict:  # fmt: skip
    """Export ``depth`` of a checkpoint's net with the BatchNorm statistics ``cfg``'s
    ``recalibrate_bn`` gives it (re-estimated on ``cfg.data`` or the checkpoint's data)."""
    ready = depth_ready(
        ckpt, net, tuple(depth), cfg.recalibrate_bn, data=cfg.get("data"), seed=cfg.seed
    )
    overwrite = cfg.overwrite if overwrite is None else overwrite
    return export_depth(ready, depth, out, fmt=fmt, overwrite=overwrite)


def check_export_config(cfg: DictConfig) -> None:
    """What export can refuse before it reads the checkpoint: arguments and the output path."""
    for key in ("ckpt_path", "depth", "out"):
        if OmegaConf.is_missing(cfg, key):
            raise UserError(f"pass {key}=...: ckpt_path=<file> depth=<name or [blocks]> out=<path>")
    if cfg.recalibrate_bn != "auto":
        check_integer(cfg.recalibrate_bn, "recalibrate_bn", minimum=0)
    check_seed(cfg.seed)
    check_out(Path(cfg.out), cfg.format, overwrite=cfg.overwrite)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
@command(check=check_export_config, run_dir=False)
def main(cfg: DictConfig) -> None:
    """Hydra entry point: prints the depth, its params and the file size."""
    depth = cfg.depth
    depth = list(depth) if isinstance(depth, ListConfig) else str(depth)
    ckpt = load_checkpoint(cfg.ckpt_path)
    net = net_from_checkpoint(ckpt, cfg.ckpt_path)
    blocks = net.depth_of(depth)  # a trained depth's name, or any depth's block counts
    info = export_from_checkpoint(ckpt, net, blocks, cfg.out, cfg=cfg, fmt=cfg.format)
    print(
        f"exported {info['name']} {info['blocks']} ({info['params'] / 1e6:.2f}M params) as "
        f"{info['format']} to {info['path']} ({info['bytes'] / 1e6:.2f} MB)"
    )


def cli() -> None:
    """``ekd-export`` / ``python -m ekd_ddnn.export``."""
    run_app(main, "export")


if __name__ == "__main__":
    cli()
