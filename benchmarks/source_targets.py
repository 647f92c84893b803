"""Which norm becomes which, across torchvision's catalogue: source kinds x targets.

For every torchvision model (``list_models()``, random weights on the meta device: no memory)
and every registered target, plan ``normswap.swap(model, target, replace="any")`` with
meta-device example inputs (a forward on meta tensors gives every norm's input rank; the
detection models, whose forward needs data, are planned without). Each norm is counted as
converted, or refused with the planner's reason; the table says, per source kind and target,
how many of the catalogue's norms convert, and why the others do not.

Run: ``python benchmarks/source_targets.py`` (about 2 minutes); writes
``benchmarks/results/source_targets.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import tv_models  # noqa: E402

import normswap  # noqa: E402
from normswap.sources import source_kind  # noqa: E402

#: Spec options the meta device needs (folding reads running statistics; ``adaln`` a condition).
OPTIONS = {"wn": {"bn": "remove"}, "adaln": {"cond_dim": 8}}


def _reason(message: str) -> str:
    """A refusal's rule, without the layer-specific details (for counting)."""
    message = re.sub(r"\b\d+\b", "N", message)
    return message.split(";")[0].split(":")[0][:90]


def census(models: list[str], targets: list[str]) -> dict:
    converted: Counter = Counter()
    refused: dict[tuple[str, str], Counter] = defaultdict(Counter)
    totals: Counter = Counter()
    for name in models:
        model = tv_models.build(name, meta=True).eval()
        kinds = {}
        for path, m in model.named_modules():
            kind = source_kind(m)
            if kind:
                kinds[path] = kind
        for kind in kinds.values():
            totals[kind] += 1
        inputs = tv_models.meta_inputs(name)
        for target in targets:
            try:
                report = normswap.swap(
                    model,
                    target,
                    replace="any",
                    example_inputs=inputs,
                    dry_run=True,
                    **OPTIONS.get(target, {}),
                )
            except normswap.SwapError as err:
                for path, message in err.problems:
                    if path in kinds:
                        refused[(kinds[path], target)][_reason(message)] += 1
                ok = {p for p in kinds if p not in dict(err.problems)}
                for path in ok:
                    converted[(kinds[path], target)] += 1
                continue
            for r in report:
                kind = kinds.get(r.path)
                if kind is None:
                    continue
                if r.action == "skip":
                    refused[(kind, target)][_reason(r.reason or "")] += 1
                else:
                    converted[(kind, target)] += 1
    return {"totals": totals, "converted": converted, "refused": refused}


def markdown(result: dict, targets: list[str]) -> str:
    totals = result["totals"]
    lines = [
        "# source_targets",
        "",
        'Norms of torchvision\'s catalogue converted to each target (`replace="any"`, meta '
        "device, ranks from a meta forward except the detection models): converted / all of "
        "that kind. Letters name the refusal reasons listed below the table.",
        "",
        "| source kind (norms) | " + " | ".join(targets) + " |",
        "|---|" + "---|" * len(targets),
    ]
    letters: dict[str, str] = {}
    for kind in sorted(totals, key=lambda k: -totals[k]):
        cells = []
        for target in targets:
            done = result["converted"][(kind, target)]
            reasons = result["refused"].get((kind, target), {})
            marks = "".join(
                letters.setdefault(r, chr(ord("a") + len(letters))) for r in sorted(reasons)
            )
            cells.append(f"{done}/{totals[kind]}" + (f" ({marks})" if marks else ""))
        lines.append(f"| {kind} ({totals[kind]}) | " + " | ".join(cells) + " |")
    lines += ["", "Refusal reasons (the planner's message, numbers as N):", ""]
    lines += [f"- ({letter}) {reason}" for reason, letter in letters.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=tv_models.ALL_MODELS)
    parser.add_argument("--out", default=str(HERE / "results" / "source_targets"))
    args = parser.parse_args()
    targets = normswap.list_norms()
    start = time.perf_counter()
    result = census(args.models, targets)
    md = markdown(result, targets)
    out = Path(args.out)
    out.with_suffix(".md").write_text(md)
    data = {
        "models": len(args.models),
        "seconds": round(time.perf_counter() - start, 1),
        "totals": dict(result["totals"]),
        "converted": {f"{k}->{t}": v for (k, t), v in result["converted"].items()},
        "refused": {f"{k}->{t}": dict(v) for (k, t), v in result["refused"].items()},
    }
    out.with_suffix(".json").write_text(json.dumps(data, indent=1, sort_keys=True))
    print(md)
    print(f"{data['seconds']} s")


if __name__ == "__main__":
    main()
