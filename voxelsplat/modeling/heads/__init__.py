"""Occupancy / flow heads and their losses."""
from .losses import OccupancyFlowLoss
from .occ_flow_head import OccFlowHead

__all__ = ["OccFlowHead", "OccupancyFlowLoss"]
