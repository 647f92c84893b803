"""Converting pretrained models so they keep what they learned.

* :mod:`~normswap.pretrained.fitters`: how each converted layer's output depends on its
  per-channel parameters (the families register theirs);
* :mod:`~normswap.pretrained.lstsq`: the least-squares sums and solve;
* :mod:`~normswap.pretrained.calibrate`: closed-form re-fit of every converted layer;
* :mod:`~normswap.pretrained.distill`: self-distillation towards the original;
* :mod:`~normswap.pretrained.fidelity`: agreement with the original;
* :mod:`~normswap.pretrained.structure`: checks that a reference is the model before its swap;
* :mod:`~normswap.pretrained.convert`: :func:`normswap.convert_pretrained`, the whole pipeline.
"""
