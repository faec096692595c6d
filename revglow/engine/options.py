"""The engine's own option names: how a ReversibleSequence keeps activations, and what its reconstruction check
does when a rebuilt input is off."""

__all__ = ["MEMORY_MODES", "RECONSTRUCTION_CHECKS"]

MEMORY_MODES = ("reversible", "checkpoint", "autograd")
RECONSTRUCTION_CHECKS = ("off", "warn", "raise")
