"""The Hydra app (``normswap-train``) and ``normswap report``: thin layers over the library.

This subpackage imports Hydra and PyTorch Lightning; the core library imports neither.
"""
