"""``python -m ekd_ddnn.summary model=<arch>``: params and MACs of every depth of a DDNN."""

from __future__ import annotations

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from ekd_ddnn import CONFIG_DIR
from ekd_ddnn.results import depth_rows, format_table
from ekd_ddnn.run.checks import check_arguments
from ekd_ddnn.run.cli import command, run_app


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="summary")
@command(check=lambda cfg: check_arguments(cfg.model, "model"), run_dir=False)
def main(cfg: DictConfig) -> None:
    """Print one row per depth: name, blocks, standalone params, MACs (one image)."""
    net = instantiate(cfg.model)
    size = net.config["image_size"]
    print(f"{net.names[0]} DDNN, {net.config['num_classes']} classes, MACs at {size}x{size}:")
    print(format_table(depth_rows(net)))


def cli() -> None:
    """``ekd-summary`` / ``python -m ekd_ddnn.summary``."""
    run_app(main, "summary")


if __name__ == "__main__":
    cli()
