"""``NormMonitor``: per-norm-layer metrics as a Lightning callback, correct under DDP.

The statistics themselves (families, definitions, the collector) live in
:mod:`normswap.metrics`, which does not import Lightning; this module decides when to collect,
reduces across processes, logs, keeps the history and draws it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer
from typing_extensions import override

from normswap.errors import NormSwapError
from normswap.monitor.collector import LayerTable, NormStatsCollector, family_summary, unpack
from normswap.monitor.families import NormLayer, find_norm_layers, list_families
from normswap.monitor.history import NormHistory
from normswap.monitor.stats import HISTORY_COLUMNS, STATS

__all__ = ["NormMonitor"]

PREFIX = "NormMonitor"
PLOT_FILENAME = "norm_monitor.png"


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _names(
    value: object, what: str, one: str, valid: Sequence[str], example: str
) -> tuple[str, ...]:
    """Validate the list of names ``value`` of argument ``what`` (one item: ``one``)."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise NormSwapError(
            f"NormMonitor: {what} must be a list of names such as {example}, got {value!r}"
        )
    names = tuple(value)
    for name in names:
        if name not in valid:
            raise NormSwapError(
                f"NormMonitor: unknown {one} {name!r} in {what}; valid: {', '.join(valid)}"
            )
    return names


class NormMonitor(Callback):
    """Log statistics of every norm layer every ``every_n_steps`` training steps.

    On a logging step (``trainer.global_step % every_n_steps == 0``, see
    :meth:`should_collect`) forward hooks are registered on the norm layers in
    ``on_train_batch_start`` and removed in ``on_train_batch_end``; parameter and gradient
    statistics are read in ``on_before_optimizer_step`` (after backward, before the update).
    Other steps run no hook and no statistic. The statistics are computed on the device into
    one preallocated tensor, summed across processes with one ``trainer.strategy.reduce`` of a
    vector whose size depends only on the number of layers (a layer that did not run on a rank
    contributes a count of 0, so nothing deadlocks and means stay correct), and logged once, by
    rank zero, to every logger of the Trainer. With gradient accumulation, the statistics of the
    accumulated batches are averaged.

    **Logged keys**, ``<stat>`` being one of :data:`normswap.monitor.stats.STATS` (definitions in
    :mod:`normswap.monitor.stats`):

    * ``NormMonitor/<family>/<stat>``: the mean over the family's layers of the per-layer
      values (each layer counts once);
    * with ``per_layer=True`` also ``NormMonitor/<family>/<path>/<stat>`` for every layer
      (``<path>`` its module path in the LightningModule, e.g. ``model.layer1.0.bn1``) and
      ``NormMonitor/<family>/<path>/calls``, its forward calls in the step summed over ranks
      (0 when it did not run anywhere). The family in the per-layer key keeps layer keys
      apart from family keys whatever the module names.

    A statistic is logged when at least one layer produced it on some rank in that step:

    =========== ==============================================================================
    family      statistics
    =========== ==============================================================================
    every one   ``in_mean in_std out_mean out_std``; ``grad_norm`` when its parameters got
                gradients
    but ``wn``  ``gamma_mean gamma_std`` (layers with a ``weight``), ``beta_mean beta_std``
                (with a ``bias``)
    ``bn``      ``bn_mean_gap bn_var_gap`` (layers with running statistics)
    ``adalin``  ``rho``
    ``adaln``   ``mod_shift mod_scale``, ``mod_gate`` for ``gate=True``
    ``dyt``     ``alpha saturated`` (the fraction of inputs where tanh saturates)
    ``derf``    ``alpha saturated``
    ``wn``      ``g_mean v_norm``
    =========== ==============================================================================

    Families: ``bn gn ln ln2d in adalin adaln dyt derf rms wn`` and any added with
    :func:`normswap.register_monitor_family` (norm families register theirs). For example, a
    model with BatchNorms and one weight-normalized conv logs exactly ``NormMonitor/bn/{in_mean,
    in_std, bn_mean_gap, bn_var_gap, out_mean, out_std, gamma_mean, gamma_std, beta_mean,
    beta_std, grad_norm}``
    and ``NormMonitor/wn/{in_mean, in_std, out_mean, out_std, g_mean, v_norm, grad_norm}``.
    Values are logged with ``step`` = the ``global_step`` of the batch they describe (the
    step Lightning gives ``self.log`` calls of that batch).

    **Picture.** At the end of fit, rank zero draws one heatmap per statistic in
    ``plot_stats`` (y: layers in forward order, x: logging steps; logarithmic colours for
    positive statistics), saves it as ``norm_monitor.png`` in ``trainer.log_dir`` (not at all
    when the first logger has no directory) and, for every TensorBoardLogger, adds it as the
    image ``NormMonitor/history``. It needs
    matplotlib; without it the picture is skipped with a warning. The per-layer history (one
    small CPU tensor per logging step) is saved in checkpoints, so a resumed run continues
    the picture.

    Args:
        every_n_steps: collect and log when ``global_step`` is a multiple of this.
        per_layer: also log every layer's statistics, not only the per-family means.
        families: monitor only layers of these families (``None``: every family).
        plot_stats: the statistics drawn at the end of fit; empty for no picture.

    Raises:
        NormSwapError: an argument is invalid (in ``__init__``), or the Trainer has no logger
            (in ``setup``).

    Example:
        >>> monitor = NormMonitor(every_n_steps=50, per_layer=True)
        >>> trainer = pl.Trainer(callbacks=[monitor], logger=pl.loggers.CSVLogger("logs"))
        >>> trainer.fit(model, loader)  # doctest: +SKIP
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        per_layer: bool = False,
        families: Sequence[str] | None = None,
        plot_stats: Sequence[str] = ("out_std", "in_std", "grad_norm"),
    ) -> None:
        if not _is_positive_int(every_n_steps):
            raise NormSwapError(
                f"NormMonitor: every_n_steps must be a positive int, got {every_n_steps!r}"
            )
        if not isinstance(per_layer, bool):
            raise NormSwapError(f"NormMonitor: per_layer must be a bool, got {per_layer!r}")
        if families is not None:
            families = _names(families, "families", "family", list_families(), "['bn', 'gn']")
            if not families:
                raise NormSwapError(
                    "NormMonitor: families is empty, so nothing would be monitored; "
                    "pass None to monitor every family"
                )
        self.every_n_steps = every_n_steps
        self.per_layer = per_layer
        self.families: tuple[str, ...] | None = families
        self.plot_stats = _names(
            plot_stats, "plot_stats", "statistic", STATS, "['out_std', 'grad_norm']"
        )
        self._layers: list[NormLayer] = []
        self._collector: NormStatsCollector | None = None
        self._history = NormHistory(paths=[], families=[])
        self._collect_step: int | None = None
        self._last_step: int | None = None

    @property
    @override
    def state_key(self) -> str:
        # Not keyed on every_n_steps/per_layer: a run resumed with another schedule keeps its
        # history. Two monitors of the same families would share a key.
        return self._generate_state_key(families=self.families)

    @property
    def history(self) -> NormHistory:
        """The per-layer statistics of every logging step so far (identical on every rank).

        Example:
            >>> NormMonitor().history.steps
            []
        """
        return self._history

    @property
    def layers(self) -> list[NormLayer]:
        """The monitored layers, in row order (filled in ``on_fit_start``).

        Example:
            >>> NormMonitor().layers
            []
        """
        return list(self._layers)

    # ----------------------------------------------------------------------------------------
    # Public overridable hooks.
    # ----------------------------------------------------------------------------------------

    def should_collect(self, trainer: pl.Trainer, step: int) -> bool:
        """Whether the training step ``step`` (``trainer.global_step``) collects and logs.

        Override it for another schedule (e.g. dense early, sparse later). It must give the
        same answer on every rank: every rank takes part in the reduction of a logging step.

        Args:
            trainer: the Trainer.
            step: the number of optimizer steps done before this batch.

        Returns:
            ``step % every_n_steps == 0`` by default.

        Example:
            >>> NormMonitor(every_n_steps=10).should_collect(None, 20)
            True
        """
        return step % self.every_n_steps == 0

    def log_metrics(self, trainer: pl.Trainer, values: dict[str, float], step: int) -> None:
        """Send the reduced metrics of one logging step to the loggers (rank zero only).

        Called on every rank with the same values; override it to route them elsewhere too.

        Args:
            trainer: the Trainer.
            values: ``{key: value}`` as documented in the class docstring.
            step: the logging step (the ``global_step`` of the batch the values describe).

        Example:
            >>> class Printing(NormMonitor):
            ...     def log_metrics(self, trainer, values, step):
            ...         super().log_metrics(trainer, values, step)
            ...         print(step, values.get("NormMonitor/bn/out_std"))
        """
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)

    # ----------------------------------------------------------------------------------------
    # Lightning hooks.
    # ----------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not trainer.loggers:
            raise NormSwapError(
                "NormMonitor needs a logger to write its metrics to, but the Trainer has none "
                "(logger=False); pass one, e.g. "
                "Trainer(logger=pytorch_lightning.loggers.CSVLogger('logs'))"
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After every setup(), configure_model and the checkpoint restore: the model is final
        # (a NormSwap callback has already converted it).
        self._layers = find_norm_layers(pl_module, self.families)
        self._collect_step = None
        if not self._layers:
            self._collector = None
            rank_zero_warn(
                f"NormMonitor found no norm layers in {type(pl_module).__name__}"
                + (f" of families {list(self.families)}" if self.families else "")
                + "; it will log nothing"
            )
            return
        self._collector = NormStatsCollector(self._layers)
        paths = [layer.path for layer in self._layers]
        families = [layer.family for layer in self._layers]
        self._history = self._history.reindexed(paths, families)
        self._collector.order = list(self._history.order)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._collector is None:
            return
        if self._collect_step is None:
            step = trainer.global_step
            if step == self._last_step or not self.should_collect(trainer, step):
                return
            self._collect_step = step
            self._collector.reset(trainer.strategy.root_device)
        self._collector.attach()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if self._collector is not None and self._collect_step is not None:
            self._collector.record_parameters()

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._collector is None or self._collect_step is None:
            return
        self._collector.detach()
        if trainer.global_step == self._collect_step:
            return  # accumulating gradients: the step continues with the next batch
        self._finish(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._abort()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._abort()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._abort()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._collector is None or not self.plot_stats or not self._history.steps:
            return
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        figure = _draw(self._history, self.plot_stats)
        if figure is None:
            return
        if log_dir is not None:
            folder = Path(log_dir)
            folder.mkdir(parents=True, exist_ok=True)
            figure.savefig(folder / PLOT_FILENAME, dpi=100)
        else:  # e.g. a logger that only sends metrics to a server: nowhere beside the logs
            rank_zero_info(
                f"NormMonitor: the first logger ({type(trainer.loggers[0]).__name__}) has no "
                f"log directory, so {PLOT_FILENAME} is not written"
            )
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(
                    f"{PREFIX}/history", figure, global_step=self._history.steps[-1], close=False
                )
                logger.experiment.flush()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": self._history.state_dict(), "last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._history = NormHistory.from_state_dict(state_dict["history"])
        self._last_step = state_dict.get("last_step")

    # ----------------------------------------------------------------------------------------
    # Private helpers.
    # ----------------------------------------------------------------------------------------

    def _abort(self) -> None:
        """Remove any hooks and drop an unfinished collection."""
        if self._collector is not None:
            self._collector.detach()
        self._collect_step = None

    def _finish(self, trainer: pl.Trainer) -> None:
        assert self._collector is not None and self._collect_step is not None
        step = self._collect_step
        self._collect_step = None
        self._last_step = step
        packed = trainer.strategy.reduce(self._collector.pack(), reduce_op="sum")
        table = unpack(packed.to("cpu"), self._collector.num_layers)  # the one host transfer
        self._history.append(step, table.history_row())
        self._history.order = list(self._collector.order)
        self.log_metrics(trainer, self._format(table), step)

    def _format(self, table: LayerTable) -> dict[str, float]:
        families = [layer.family for layer in self._layers]
        out: dict[str, float] = {}
        for family, (values, present) in family_summary(table, families).items():
            for stat, value, ok in zip(STATS, values.tolist(), present.tolist(), strict=True):
                if ok:
                    out[f"{PREFIX}/{family}/{stat}"] = value
        if self.per_layer:
            values, counts, calls = table.values.tolist(), table.counts.tolist(), table.calls
            for row, layer in enumerate(self._layers):
                prefix = f"{PREFIX}/{layer.family}/{layer.path}/"
                for stat, value, count in zip(STATS, values[row], counts[row], strict=True):
                    if count > 0:
                        out[prefix + stat] = value
                out[prefix + "calls"] = float(calls[row])
        return out


def _draw(history: NormHistory, stats: Sequence[str]) -> Any:
    """One heatmap per statistic (layers × logging steps), or ``None`` without matplotlib."""
    try:
        import numpy as np
        from matplotlib.colors import LogNorm
        from matplotlib.figure import Figure
    except ImportError:
        rank_zero_warn(
            "NormMonitor: matplotlib is not installed, so the picture of the norm statistics "
            "is skipped (the metrics are logged); install it with `pip install matplotlib`"
        )
        return None
    num_layers = len(history.paths)
    order = list(history.order) + [i for i in range(num_layers) if i not in history.order]
    data = history.stacked()[:, order].numpy()  # (T, L, columns)
    steps = history.steps
    labels = [f"{history.paths[i]} ({history.families[i]})" for i in order]
    height = max(3.0, 0.16 * num_layers + 1.5)
    # No pyplot: a bare Figure draws with Agg and leaves the user's backend alone.
    figure = Figure(figsize=(3.0 + 3.5 * len(stats), height), layout="constrained")
    axes = figure.subplots(1, len(stats), sharey=True, squeeze=False)[0]
    for ax, stat in zip(axes, stats, strict=True):
        image = data[..., HISTORY_COLUMNS.index(stat)].T  # (L, T)
        finite = image[np.isfinite(image)]
        norm = None
        if finite.size and (finite > 0).all() and finite.max() > finite.min():
            norm = LogNorm(vmin=float(finite.min()), vmax=float(finite.max()))
        elif not finite.size:
            norm = None
            image = np.zeros_like(image)
        shown = ax.imshow(
            np.ma.masked_invalid(image), aspect="auto", interpolation="nearest", norm=norm
        )
        figure.colorbar(shown, ax=ax)
        ax.set_title(stat)
        ax.set_xlabel("global step")
        ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 6)).round().astype(int))
        ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
    every = max(1, num_layers // 60)
    axes[0].set_yticks(range(0, num_layers, every), labels[::every], fontsize=7)
    axes[0].set_ylabel("layer (forward order)")
    return figure
