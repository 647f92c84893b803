"""Ready experiments for ``normswap-train +recipe=NAME`` (Hydra ``# @package _global_`` files)."""
