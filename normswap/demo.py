"""``make demo``: a quick norm shootout on Fashion-MNIST, then ``normswap report`` on it.

Runs the ``norm_shootout`` recipe with one seed (resnet18, every norm, one epoch on 6,000
real Fashion-MNIST images: about 40 s per norm on 2 CPU cores, with a progress bar) into
``outputs/demo/norm_shootout`` and writes the ranked table and plots there; the plots say that
there is one seed per point. The recipe itself runs 3 seeds (``normswap-train
+recipe=norm_shootout``). Pass extra Hydra overrides after the command, e.g.
``python -m normswap.demo data.train_size=2000`` or ``seed=0,1,2`` for the spread.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from normswap.app.report import write_report
from normswap.errors import NormSwapError

__all__ = ["main"]

OUT = Path("outputs/demo/norm_shootout")
#: One seed keeps ``make demo`` to one run per norm (later overrides win: ``seed=0,1,2``).
DEMO_OVERRIDES = ("seed=0",)


def main(argv: list[str] | None = None) -> int:
    """Run the sweep and the report; returns the exit code.

    Example:
        >>> main(["data.train_size=500"])  # doctest: +SKIP
        0
    """
    extra = sys.argv[1:] if argv is None else argv
    if OUT.exists():
        shutil.rmtree(OUT)  # only the demo's own folder
    cmd = [
        sys.executable,
        "-m",
        "normswap.app.train",
        "+recipe=norm_shootout",
        f"hydra.sweep.dir={OUT}",
        *DEMO_OVERRIDES,
        *extra,
    ]
    print("$", " ".join(cmd[2:]), flush=True)
    if subprocess.run(cmd).returncode != 0:
        print("demo: the sweep failed (see above)", file=sys.stderr)
        return 1
    try:
        table, files = write_report(OUT)
    except NormSwapError as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 2
    print("\n" + table + "\n")
    for path in files:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
