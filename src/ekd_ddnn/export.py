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
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor, nn

from ekd_ddnn import CONFIG_DIR
from ekd_ddnn.calibration import recalibrate_bn
from ekd_ddnn.checkpoint import data_config, load_checkpoint, net_from_checkpoint
from ekd_ddnn.errors import UserError, report_user_errors, run_app
from ekd_ddnn.models import DepthDynamicNet, count_params

FORMATS = ("state_dict", "torchscript", "onnx")


class LogitsOnly(nn.Module):
    """Wraps a standalone DDNN depth (which returns logits and features) to return logits."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out[0] if isinstance(out, tuple) else out


def _write_atomically(path: Path, write) -> None:
    """Write through a temporary file, so a failed export never leaves a partial ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass overwrite=true to replace it")
    if not out.parent.is_dir():
        raise UserError(f"cannot write {out}: directory {out.parent} does not exist")
    blocks = net.depth_of(depth)
    standalone = net.extract(blocks).eval()
    size = net.config["image_size"]
    example = torch.randn(2, net.config["in_channels"], size, size)
    model = LogitsOnly(standalone).eval()
    if fmt == "state_dict":
        _write_atomically(out, lambda p: torch.save(standalone.state_dict(), p))
    elif fmt == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(model, example)
        _write_atomically(out, lambda p: traced.save(str(p)))
    else:
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise UserError(
                "ONNX export needs the onnx extra: pip install 'ekd-ddnn[onnx]'"
            ) from None
        batch = torch.export.Dim("batch", min=1)

        def write_onnx(p: Path) -> None:
            torch.onnx.export(
                model,
                (example,),
                str(p),
                dynamo=True,
                dynamic_shapes=({0: batch},),
                input_names=["images"],
                output_names=["logits"],
                external_data=False,  # one self-contained file
                verbose=False,
            )

        _write_atomically(out, write_onnx)
    return {
        "name": net.name_of(blocks),
        "blocks": list(blocks),
        "params": count_params(standalone),
        "format": fmt,
        "path": str(out),
        "bytes": out.stat().st_size,
    }


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
@report_user_errors
def main(cfg: DictConfig) -> None:
    """Hydra entry point: prints the depth, its params and the file size."""
    for key in ("ckpt_path", "depth", "out"):
        if OmegaConf.is_missing(cfg, key):
            raise UserError(f"pass {key}=...: ckpt_path=<file> depth=<name or [blocks]> out=<path>")
    depth = cfg.depth
    depth = list(depth) if isinstance(depth, ListConfig) else str(depth)
    ckpt = load_checkpoint(cfg.ckpt_path)
    net = net_from_checkpoint(ckpt, cfg.ckpt_path)
    if cfg.recalibrate_bn:
        if net.depth_of(depth) not in net.depths:
            raise UserError(
                f"recalibrate_bn needs one of the depths the net trained, "
                f"{[list(d) for d in net.depths]}; got {depth}"
            )
        datamodule = instantiate(data_config(ckpt, cfg.get("data")))
        recalibrate_bn(net, datamodule, cfg.recalibrate_bn, seed=cfg.seed)
    info = export_depth(net, depth, cfg.out, fmt=cfg.format, overwrite=cfg.overwrite)
    print(
        f"exported {info['name']} {info['blocks']} ({info['params'] / 1e6:.2f}M params) as "
        f"{info['format']} to {info['path']} ({info['bytes'] / 1e6:.2f} MB)"
    )


if __name__ == "__main__":
    run_app(main, CONFIG_DIR)
