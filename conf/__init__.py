"""Hydra configuration groups, installed as the package ``normswap.conf``.

This file only makes ``conf/`` an importable package (see ``[tool.setuptools.package-dir]`` in
pyproject.toml), so Hydra can load it as ``pkg://normswap.conf`` from a checkout, an editable
install or a wheel. It holds no code.
"""
