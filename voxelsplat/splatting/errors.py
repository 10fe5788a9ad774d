"""Errors of the splatting package, apart from the modules that raise them (every backend
imports this, nothing here imports a backend)."""

__all__ = ["BackendUnavailableError"]


class BackendUnavailableError(RuntimeError):
    """A rasterization backend was requested that cannot run here."""
