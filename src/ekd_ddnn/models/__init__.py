"""Depth-dynamic networks: the shared base, the families, and their registry."""

from ekd_ddnn.models.base import Depth, DepthDynamicNet, count_macs, count_params
from ekd_ddnn.models.registry import ARCHS, build_net, list_archs

__all__ = [
    "ARCHS",
    "Depth",
    "DepthDynamicNet",
    "build_net",
    "count_macs",
    "count_params",
    "list_archs",
]
