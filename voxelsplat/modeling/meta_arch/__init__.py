"""Whole models."""
from .occupancy_flow import OccupancyFlowModel

__all__ = ["OccupancyFlowModel"]
