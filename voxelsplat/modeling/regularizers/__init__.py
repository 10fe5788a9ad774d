"""Training-only regularizers; importing this package registers them."""
from .gaussian_splat import GaussianSplatRegularizer

__all__ = ["GaussianSplatRegularizer"]
