"""MkDocs hooks: the pages generated at build time.

* ``results/<name>.md``: one page per benchmark result in ``benchmarks/results/`` — what the
  benchmark measures (its script's docstring), how to reproduce it, the tables its script wrote
  from the run (``<name>.md``, made from the same data as ``<name>.json``; a result without one
  is tabulated from its JSON), its plots and the raw JSON. A JSON file no entry of
  :data:`RESULTS` claims fails the build, so a new benchmark cannot go undocumented.
* ``concepts/normalizations.png``: what each normalization computes its statistics over,
  drawn from the definitions in :data:`NORMS`.
* ``reference/options.md``: every option of every config group, read from ``conf/``.
* ``reference/cli.md``: the command line's ``--help`` texts.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"


@dataclass(frozen=True)
class Result:
    """A benchmark result page: the JSON stems it shows, its script and how to reproduce it."""

    page: str
    title: str
    script: str
    command: str
    stems: tuple[str, ...]
    group: str


RESULTS: tuple[Result, ...] = (
    Result(
        "transformers_fidelity",
        "Pretrained transformers: LayerNorm to DyT, Derf, RMSNorm, frozen",
        "transformers_fidelity.py",
        "make bench-transformers",
        ("transformers_fidelity",),
        "Pretrained conversion",
    ),
    Result(
        "transfer",
        "Pretrained CNN: accuracy after fine-tuning from each start",
        "transfer.py",
        "make bench-fidelity",
        ("transfer",),
        "Pretrained conversion",
    ),
    Result(
        "fidelity",
        "Pretrained CNN: agreement after conversion",
        "fidelity.py",
        "make bench-fidelity",
        ("fidelity",),
        "Pretrained conversion",
    ),
    Result(
        "ood",
        "Pretrained CNN: agreement out of domain",
        "ood.py",
        ".venv/bin/python benchmarks/ood.py",
        ("ood",),
        "Pretrained conversion",
    ),
    Result(
        "source_targets",
        "Which norm becomes which across torchvision",
        "source_targets.py",
        ".venv/bin/python benchmarks/source_targets.py",
        ("source_targets",),
        "Coverage",
    ),
    Result(
        "step_time",
        "Training step time vs BatchNorm",
        "step_time.py",
        "make bench-grid",
        ("step_time_grid", "step_time_full_64", "step_time_full_224"),
        "Cost",
    ),
    Result(
        "step_time_rechecks",
        "Training step time: channels_last rechecks",
        "step_time.py",
        ".venv/bin/python benchmarks/step_time.py --help (the commands are in benchmarks/NOTES.md)",
        (
            "step_time_full_64_cl_recheck",
            "step_time_full_224_cl_recheck",
            "step_time_gn_cl_recheck",
            "step_time_gn_r18b8_224_cl_recheck",
            "step_time_ln2d_cl_recheck",
            "step_time_ln2d_contig_recheck",
        ),
        "Cost",
    ),
    Result(
        "layer_overhead",
        "Layer overhead against the native ops",
        "layer_overhead.py",
        "make bench",
        ("layer_overhead", "layer_overhead_compile"),
        "Cost",
    ),
    Result(
        "conversion_cost",
        "Conversion time and memory",
        "conversion_cost.py",
        "make bench",
        ("conversion_cost",),
        "Cost",
    ),
    Result(
        "inference",
        "Inference: folding and torch.compile",
        "inference.py",
        "make bench",
        ("inference",),
        "Cost",
    ),
    Result(
        "monitor_overhead",
        "NormMonitor overhead",
        "monitor_overhead.py",
        "make bench",
        ("monitor_overhead",),
        "Cost",
    ),
    Result(
        "cuda_amp",
        "CUDA and mixed precision",
        "cuda_amp.py",
        ".venv/bin/python benchmarks/cuda_amp.py (on a GPU)",
        ("cuda_amp",),
        "Cost",
    ),
)


def _summary(script: str) -> str:
    """The script's module docstring (its description of what it measures)."""
    tree = ast.parse((REPO / "benchmarks" / script).read_text())
    return ast.get_docstring(tree) or ""


def _rst_to_md(text: str) -> str:
    """The docstrings' RST literals and roles as Markdown code."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def _json_table(data: Any) -> str:
    """A Markdown table of a JSON result that has no table of its script's."""
    rows = (
        data
        if isinstance(data, list)
        else next((v for v in data.values() if isinstance(v, list)), [])
    )
    rows = [r for r in rows if isinstance(r, dict)]
    if not rows:
        return "```json\n" + json.dumps(data, indent=1)[:4000] + "\n```\n"
    keys = [k for k in rows[0] if not isinstance(rows[0][k], (dict, list))]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _demote(markdown: str) -> str:
    """Headings of an included table file, two levels down (the page has its own title)."""
    return re.sub(r"^(#+)", r"\1##", markdown, flags=re.MULTILINE)


def _result_page(result: Result, files: Files, config: Any) -> str:
    lines = [f"# {result.title}", ""]
    summary = _rst_to_md(_summary(result.script))
    lines += [
        f"From `benchmarks/{result.script}`:",
        "",
        *("> " + line if line else ">" for line in summary.splitlines()),
        "",
        "**Reproduce:**",
        "",
        f"```bash\n{result.command}\n```",
        "",
    ]
    for stem in result.stems:
        data_file = RESULTS_DIR / f"{stem}.json"
        if len(result.stems) > 1:
            lines += [f"## {stem}", ""]
        table = RESULTS_DIR / f"{stem}.md"
        if table.exists():
            lines += [_demote(table.read_text()), ""]
        else:
            lines += [_json_table(json.loads(data_file.read_text())), ""]
        for png in sorted(RESULTS_DIR.glob(f"{stem}*.png")):
            name = f"results/{png.name}"
            if files.get_file_from_path(name) is None:
                files.append(File.generated(config, name, content=png.read_bytes()))
            lines += [f"![{png.stem}]({png.name})", ""]
        raw = f"results/{stem}.json"
        if files.get_file_from_path(raw) is None:
            files.append(File.generated(config, raw, content=data_file.read_bytes()))
        lines += [f"Raw data: [{stem}.json]({stem}.json)", ""]
    return "\n".join(lines)


def _results_index() -> str:
    lines = [
        "# Results",
        "",
        "Every figure normswap's documentation quotes comes from a script in `benchmarks/` that "
        "writes its numbers to `benchmarks/results/<name>.json` (and a table, `<name>.md`); "
        "these pages are built from those files, each with the command that reproduces it. "
        "Timings are ratios measured side by side in one run on the machine named on each "
        "page; accuracy comparisons give every method its best learning rate of a small grid "
        "and the spread over seeds.",
        "",
    ]
    for group in dict.fromkeys(r.group for r in RESULTS):
        lines += [f"## {group}", ""]
        if group == "Cost":
            lines += ["- [Cost at a glance](cost.md): every target's training step, in one table"]
        lines += [f"- [{r.title}]({r.page}.md)" for r in RESULTS if r.group == group]
        lines += [""]
    lines += [
        "## Training runs",
        "",
        "- [The norm shootout](norm_shootout.md): every norm that trains from scratch, 3 seeds",
        "- [Small batches](small_batch.md): BN vs GN vs LN from 2 to 32 images per device",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the figure

#: What one set of statistics spans, per norm: (samples, channels, positions) covered by the
#: highlighted set (``"all"``, ``"one"`` or ``"group"``); ``None``: no statistics at all.
NORMS: dict[str, tuple[str, str, str] | None] = {
    "BatchNorm (bn)": ("all", "one", "all"),
    "LayerNorm over (C, H, W) (ln)": ("one", "all", "all"),
    "InstanceNorm (in)": ("one", "one", "all"),
    "GroupNorm (gn)": ("one", "group", "all"),
    "LayerNorm over channels, RMSNorm (ln2d, rms,\ntransformers' LayerNorm)": ("one", "all", "one"),
    "DyT, Derf, frozen: no statistics": None,
}


def _figure() -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n, c, p, group = 3, 6, 4, 2
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.4))
    for ax, (title, span) in zip(axes.flat, NORMS.items(), strict=True):
        for s in range(n):
            for ch in range(c):
                for pos in range(p):
                    x, y = s * (p + 1) + pos, c - 1 - ch
                    chosen = False
                    if span is not None:
                        ss, cs, ps = span
                        chosen = (
                            (ss == "all" or s == 0)
                            and (cs == "all" or ch == 0 or (cs == "group" and ch < group))
                            and (ps == "all" or pos == 0)
                        )
                    ax.add_patch(
                        Rectangle(
                            (x, y),
                            1,
                            1,
                            facecolor="#2b7bba" if chosen else "#e8eef4",
                            edgecolor="white",
                        )
                    )
        ax.set_xlim(0, n * (p + 1) - 1)
        ax.set_ylim(0, c)
        ax.set_aspect("equal")
        ax.set_xticks([s * (p + 1) + p / 2 for s in range(n)], [f"sample {s}" for s in range(n)])
        ax.set_yticks([c - 0.5 - ch for ch in range(c)], [f"C{ch}" for ch in range(c)])
        ax.tick_params(length=0, labelsize=8)
        for side in ax.spines.values():
            side.set_visible(False)
        ax.set_title(title, fontsize=10)
    fig.suptitle(
        "The values that share one mean and variance (blue), each sample's positions side by side",
        fontsize=11,
    )
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


# --------------------------------------------------------------------------- reference pages


def _options_page() -> str:
    conf = REPO / "conf"
    lines = [
        "# Config options",
        "",
        "Every option of every config group of `normswap-train`, as shipped in `conf/` (the "
        "package `normswap.conf`); pick one with `group=option` and override a field with "
        "`group.field=value`. The `model`, `norm`, `data` and `task` options are checked "
        "against a typed schema ([`normswap.app.schema`][normswap.app.schema]). The recipes "
        "(`+recipe=NAME`) follow.",
        "",
    ]
    groups = sorted(p for p in conf.iterdir() if p.is_dir() and not p.name.startswith("_"))
    for group in groups:
        lines += [f"## `{group.name}`", ""]
        for option in sorted(group.rglob("*.yaml")):
            name = option.relative_to(group).with_suffix("").as_posix()
            lines += [f"### `{group.name}={name}`", "", "```yaml", option.read_text().rstrip()]
            lines += ["```", ""]
    lines += ["## Recipes", ""]
    for recipe in sorted((REPO / "recipes").glob("*.yaml")):
        lines += [f"### `+recipe={recipe.stem}`", "", "```yaml", recipe.read_text().rstrip()]
        lines += ["```", ""]
    return "\n".join(lines)


def _cli_page() -> str:
    from normswap import cli

    parser = cli._parser()
    lines = [
        "# Command line",
        "",
        "`normswap` inspects and converts models from a shell; `normswap-train` is the Hydra "
        "app ([guide](../how-to/hydra-app.md), [options](options.md)); `normswap report` "
        "ranks a sweep's runs.",
        "",
    ]
    lines += ["```text", parser.format_help().rstrip(), "```", ""]
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in subparsers:
        for name, sub in action.choices.items():
            lines += [f"## `normswap {name}`", "", "```text", sub.format_help().rstrip()]
            lines += ["```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the hooks


def on_config(config: Any) -> Any:
    """The Results section of the navigation lists every result page, from :data:`RESULTS`."""
    for item in config["nav"]:
        if isinstance(item, dict) and "Results" in item:
            item["Results"] = [
                "results/index.md",
                {"Cost at a glance": "results/cost.md"},
                *({r.title: f"results/{r.page}.md"} for r in RESULTS),
                {"The norm shootout": "results/norm_shootout.md"},
                {"Small batches": "results/small_batch.md"},
            ]
    return config


def on_files(files: Files, config: Any) -> Files:
    claimed = {stem for r in RESULTS for stem in r.stems}
    unclaimed = sorted(p.stem for p in RESULTS_DIR.glob("*.json") if p.stem not in claimed)
    if unclaimed:
        raise SystemExit(
            f"docs/hooks.py: benchmarks/results/{unclaimed[0]}.json has no results page: add "
            "it to RESULTS (every result is documented)"
        )
    missing = sorted(s for s in claimed if not (RESULTS_DIR / f"{s}.json").exists())
    if missing:
        raise SystemExit(
            f"docs/hooks.py: RESULTS names benchmarks/results/{missing[0]}.json, absent"
        )
    pages = {
        "results/index.md": _results_index(),
        "reference/options.md": _options_page(),
        "reference/cli.md": _cli_page(),
    }
    for result in RESULTS:
        pages[f"results/{result.page}.md"] = _result_page(result, files, config)
    for path, text in pages.items():
        old = files.get_file_from_path(path)
        if old is not None:
            files.remove(old)
        files.append(File.generated(config, path, content=text))
    files.append(File.generated(config, "concepts/normalizations.png", content=_figure()))
    return files


# --------------------------------------------------------------------------- reference coverage

#: The modules whose every public name (``__all__``) the API reference must render.
DOCUMENTED = ("normswap", "normswap.callbacks", "normswap.app.*")


def _public_names() -> dict[str, list[str]]:
    import importlib
    import pkgutil

    modules = []
    for name in DOCUMENTED:
        if name.endswith(".*"):
            package = importlib.import_module(name[:-2])
            modules += [
                f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)
            ]
        else:
            modules.append(name)
    out = {}
    for name in modules:
        module = importlib.import_module(name)
        out[name] = [n for n in getattr(module, "__all__", []) if not n.startswith("__")]
    return out


def on_post_build(config: Any) -> None:
    """Fail the build when a public name has no entry in the API reference."""
    site = Path(config["site_dir"]) / "reference"
    html = "".join(p.read_text() for p in site.rglob("*.html"))
    anchors = set(re.findall(r'id="([\w.]+)"', html))
    missing = [
        f"{module}.{name}"
        for module, names in _public_names().items()
        for name in names
        if f"{module}.{name}" not in anchors and not any(a.endswith(f".{name}") for a in anchors)
    ]
    if missing:
        raise PluginError(
            f"the API reference renders no entry for {', '.join(missing)}: add a docstring, or "
            "a ::: directive to a page of docs/reference/"
        )


# --------------------------------------------------------------------------- page checks

FENCE = re.compile(r"^(\s*)```(\S*)\s*$")


def fence_problem(markdown: str) -> str | None:
    """A code fence left open, or one with a language inside a block (a block that swallows
    the prose after it): Markdown renders both without a warning."""
    opened: tuple[int, str] | None = None
    for number, line in enumerate(markdown.splitlines(), 1):
        match = FENCE.match(line)
        if not match:
            continue
        if opened is None:
            opened = (number, match.group(2))
        elif match.group(2):
            return (
                f"line {number}: a ```{match.group(2)} fence inside the block opened on "
                f"line {opened[0]}"
            )
        else:
            opened = None
    return None if opened is None else f"line {opened[0]}: a code fence that is never closed"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Fail the build on a broken code fence."""
    problem = fence_problem(markdown)
    if problem:
        raise PluginError(f"{page.file.src_uri}: {problem}")
    return markdown
