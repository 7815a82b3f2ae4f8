"""``python -m ekd_ddnn.summary model=<arch>``: params and MACs of every depth of a DDNN."""

from __future__ import annotations

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from ekd_ddnn import CONFIG_DIR
from ekd_ddnn.errors import report_user_errors, run_app
from ekd_ddnn.results import depth_rows, format_table


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="summary")
@report_user_errors
def main(cfg: DictConfig) -> None:
    """Print one row per depth: name, blocks, standalone params, MACs (one image)."""
    net = instantiate(cfg.model)
    size = net.config["image_size"]
    print(f"{net.names[0]} DDNN, {net.config['num_classes']} classes, MACs at {size}x{size}:")
    print(format_table(depth_rows(net)))


if __name__ == "__main__":
    run_app(main, CONFIG_DIR)
