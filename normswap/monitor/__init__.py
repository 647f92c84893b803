"""Per-norm-layer statistics without Lightning: which family a layer is reported under
(:mod:`~normswap.monitor.families`), the statistics (:mod:`~normswap.monitor.stats`), one
step's collection (:mod:`~normswap.monitor.collector`) and the history of steps
(:mod:`~normswap.monitor.history`). :class:`normswap.callbacks.NormMonitor` is the Lightning glue.
"""
