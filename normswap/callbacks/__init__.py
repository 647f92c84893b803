"""Lightning callbacks: ``NormSwap`` (the surgery) and ``NormMonitor`` (per-norm metrics).

This subpackage imports PyTorch Lightning; the rest of normswap does not.
"""

from normswap.callbacks.monitor import NormMonitor
from normswap.callbacks.swap import CalibrateFn, NormSwap

__all__ = ["CalibrateFn", "NormMonitor", "NormSwap"]
