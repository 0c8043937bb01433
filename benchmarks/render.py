"""Render saved op-suite results (pytest-benchmark JSON) to markdown tables and a plot.

    python benchmarks/render.py RUN.json [--out benchmarks/results] [--name STEM]
    python benchmarks/render.py BASE.json HEAD.json [--labels base head]     # the comparison of two

One JSON: per group (op, pass, shape, dtype, device), every method's median and IQR, its bandwidth
(GB/s and its share of the device's peak HBM bandwidth, or of the copy measured in the same run)
and its time relative to the index_select floor (or to the fastest method). Two JSONs: per method
the medians of both runs and their ratio. Writes STEM.md and STEM.png (one panel per group).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from matplotlib.ticker import FuncFormatter, NullFormatter

from aclip_kernels.benchmarking import RESULTS, markdown_table, pyplot, save_figure, targets_line

FLOOR = "index_select_floor"
# The kernel issues' targets for attentive_mask's forward on a GPU (stated for ViT-B/16, 256 images x 2
# views, bf16, on the H200): share of the data-sheet HBM bandwidth per backend, speed-ups over the
# baselines, and cuda no slower than triton by more than 10%.
BANDWIDTH_TARGET = {"triton": 0.60, "cuda": 0.70}
SPEEDUP_TARGET = {"published_aclip": 5.0, "timm_argsort_gather": 2.0}
CUDA_VS_TRITON_MAX = 1.10
FAMILY_COLOURS = {"aclip_kernels": "tab:blue", "floor": "0.55", "baseline": "tab:orange"}


def load(path) -> dict:
    """{"label", "env", "groups": {group: {method: benchmark}}} of a pytest-benchmark JSON."""
    data = json.loads(Path(path).read_text())
    groups = {}
    for b in data["benchmarks"]:
        groups.setdefault(b["group"], {})[b["params"]["method"]] = b
    env = data["machine_info"].get("aclip_kernels", {})
    commit = data.get("commit_info", {})
    label = data["machine_info"].get("aclip_kernels_label") or (
        (commit.get("id") or "")[:8] + ("+dirty" if commit.get("dirty") else "")) or Path(path).stem
    return {"label": label, "env": env, "groups": groups, "datetime": data.get("datetime", "")}


def family(method: str) -> str:
    return "aclip_kernels" if method.startswith("aclip_kernels.") else "floor" if method == FLOOR else "baseline"


def describe(run: dict) -> str:
    parts = [f"{e['device']} ({e['machine']}, {e['threads']} threads), torch {e['torch']}, triton {e['triton']}, "
             f"commit {e['git_commit'] or 'of an installed copy'}" for e in run["env"].values()]
    return "; ".join(parts) + f", {run['datetime'][:16]} UTC"


def _share(extra: dict) -> str:
    if "share_of_peak_hbm" in extra:
        return f"{extra['share_of_peak_hbm']:.1%} of {extra['peak_hbm_TB_per_s']} TB/s"
    if "share_of_copy" in extra:
        return f"{extra['share_of_copy']:.1%} of copy"
    return "-"


def targets(methods: dict) -> list:
    """[{target, measured, met}] for an attentive_mask forward group on a GPU, else []."""
    extra = next(iter(methods.values()))["extra_info"]
    if (extra.get("op"), extra.get("passes"), extra.get("device")) != ("attentive_mask", "fwd", "cuda"):
        return []
    median = {m: b["stats"]["median"] for m, b in methods.items()}
    out = []
    for backend in ("triton", "cuda"):
        name = f"aclip_kernels.{backend}"
        if name not in median:
            continue
        share = methods[name]["extra_info"].get("share_of_peak_hbm")
        if share is not None:
            out.append({"target": f"{backend}: >= {BANDWIDTH_TARGET[backend]:.0%} of peak HBM bandwidth",
                        "measured": f"{share:.1%}", "met": share >= BANDWIDTH_TARGET[backend]})
        for baseline, factor in SPEEDUP_TARGET.items():
            if baseline in median:
                speedup = median[baseline] / median[name]
                out.append({"target": f"{backend}: >= {factor:g}x faster than {baseline}",
                            "measured": f"{speedup:.2f}x", "met": speedup >= factor})
    if "aclip_kernels.cuda" in median and "aclip_kernels.triton" in median:
        ratio = median["aclip_kernels.cuda"] / median["aclip_kernels.triton"]
        out.append({"target": f"cuda time <= {CUDA_VS_TRITON_MAX:.2f}x triton's", "measured": f"{ratio:.2f}x",
                    "met": ratio <= CUDA_VS_TRITON_MAX})
    return out


def single_markdown(run: dict, source: str) -> str:
    lines = [f"# Op suite: {source}", "", f"Measured on {describe(run)}. Medians of timed rounds with the cache "
             "flushed before each call (GPU: CUDA-event time). Bandwidth = the bytes the op must move / median; "
             "its share is of the device's data-sheet HBM bandwidth, or (CPU) of a copy measured in the same run.",
             ""]
    for group, methods in run["groups"].items():
        medians = {m: b["stats"]["median"] for m, b in methods.items()}
        ref = FLOOR if FLOOR in medians else min(medians, key=medians.get)
        rows = [(m, f"{b['stats']['median'] * 1e3:.3f}", f"{b['stats']['iqr'] * 1e3:.3f}", b["stats"]["rounds"],
                 f"{b['extra_info'].get('GB_per_s', float('nan')):.2f}", _share(b["extra_info"]),
                 f"{medians[m] / medians[ref]:.2f}x")
                for m, b in sorted(methods.items(), key=lambda kv: kv[1]["stats"]["median"])]
        lines += [f"**{group}**", ""] + markdown_table(
            ["method", "median ms", "IQR ms", "rounds", "GB/s", "bandwidth share", f"time vs {ref}"], rows,
            [False, True, True, True, True, True, True]) + [""]
        if targets(methods):
            lines += [targets_line(targets(methods)), ""]
    return "\n".join(lines)


def compare_markdown(base: dict, head: dict) -> str:
    lines = [f"# Op suite: {head['label']} vs {base['label']}", "", f"Base ({base['label']}): {describe(base)}.",
             f"Head ({head['label']}): {describe(head)}.", "",
             "Medians; ratio = head / base (below 1: head is faster).", ""]
    for group in dict.fromkeys([*base["groups"], *head["groups"]]):
        b, h = base["groups"].get(group, {}), head["groups"].get(group, {})
        rows = []
        for m in dict.fromkeys([*b, *h]):
            tb = b[m]["stats"]["median"] if m in b else None
            th = h[m]["stats"]["median"] if m in h else None
            rows.append((m, f"{tb * 1e3:.3f}" if tb else "-", f"{th * 1e3:.3f}" if th else "-",
                         f"{th / tb:.2f}x" if tb and th else "-"))
        lines += [f"**{group}**", ""] + markdown_table(
            ["method", f"{base['label']} median ms", f"{head['label']} median ms", "head / base"], rows,
            [False, True, True, True]) + [""]
        controls = [h[m]["stats"]["median"] / b[m]["stats"]["median"] for m in b if m in h and family(m) != "aclip_kernels"]
        if controls:
            lines += [f"Control: the methods outside the library (baselines, floor) changed by {statistics.median(controls):.2f}x "
                      "(median); unless `aclip_kernels.baselines` changed, that is how much the machine drifted between "
                      "the two runs, and the library's ratios mean something only beyond it.", ""]
    return "\n".join(lines)


def _ms(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def plot(runs: list, path: Path) -> None:
    """One panel per group: median ms per method (log scale), the quartiles as error bars; with two runs,
    the bars of each side by side."""
    plt = pyplot()
    groups = list(dict.fromkeys(g for run in runs for g in run["groups"]))
    cols = min(3, len(groups))
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 0.45 * 9 * rows + 0.6), squeeze=False)
    height = 0.8 / len(runs)
    for ax, group in zip(axes.flat, groups):
        methods = list(dict.fromkeys(m for run in runs for m in run["groups"].get(group, {})))
        for k, run in enumerate(runs):
            found = run["groups"].get(group, {})
            ys = [i + (k - (len(runs) - 1) / 2) * height for i, m in enumerate(methods) if m in found]
            stats = [found[m]["stats"] for m in methods if m in found]
            colours = [FAMILY_COLOURS[family(m)] for m in methods if m in found]
            bars = ax.barh(ys, [s["median"] * 1e3 for s in stats], height=height * 0.9,
                           xerr=[[(s["median"] - s["q1"]) * 1e3 for s in stats],
                                 [(s["q3"] - s["median"]) * 1e3 for s in stats]], color=colours,
                           alpha=1.0 if k == len(runs) - 1 else 0.45,
                           edgecolor="black" if len(runs) > 1 and k == len(runs) - 1 else None, capsize=2)
            ax.bar_label(bars, labels=[_ms(s["median"] * 1e3) for s in stats], fontsize=6, padding=2)
        ax.set_yticks(range(len(methods)))
        ax.set_yticklabels(methods, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.margins(x=0.15)
        low, high = ax.get_xlim()
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}") if high / low < 10 else NullFormatter())
        ax.set_xlabel("median time per call (ms, log scale)", fontsize=8)
        ax.set_title(group, fontsize=8)
        ax.grid(True, axis="x", which="both", alpha=0.3)
    for ax in axes.flat[len(groups):]:
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in FAMILY_COLOURS.values()]
    labels = ["aclip_kernels backends", "index_select floor (same rows, known indices)", "baselines"]
    if len(runs) > 1:
        handles += [plt.Rectangle((0, 0), 1, 1, color="tab:blue", alpha=0.45),
                    plt.Rectangle((0, 0), 1, 1, color="tab:blue", ec="black")]
        labels += [f"base: {runs[0]['label']} (pale, upper bar)", f"head: {runs[1]['label']} (outlined, lower bar)"]
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=len(labels))
    devices = sorted({e["machine"] for run in runs for e in run["env"].values()})
    what = f"{runs[1]['label']} vs {runs[0]['label']}" if len(runs) > 1 else runs[0]["label"]
    fig.subplots_adjust(bottom=0.1)
    save_figure(fig, path, f"aclip_kernels op suite, {what} — {'; '.join(devices)}, {runs[-1]['datetime'][:10]}",
                rect=(0, 0.04, 1, 1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="one pytest-benchmark JSON, or two (base, head) to compare")
    parser.add_argument("--out", default=str(RESULTS), help="folder for STEM.md and STEM.png")
    parser.add_argument("--name", default=None, help="file stem (default: the JSON's, or BASE_vs_HEAD)")
    parser.add_argument("--labels", nargs=2, default=None, help="names of base and head (default: their commits)")
    parser.add_argument("--note", default="", help="a sentence under the title, e.g. on the machine's load")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if len(args.json) > 2:
        parser.error(f"json: one file, or two to compare; got {len(args.json)}")
    runs = []
    for path in args.json:
        try:
            runs.append(load(path))
        except OSError as error:
            parser.error(f"json: cannot read {path}: {error.strerror or error}")
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            parser.error(f"json: {path} is not a pytest-benchmark JSON of benchmarks/ops "
                         f"({type(error).__name__}: {error})")
    if args.labels and len(runs) == 2:
        runs[0]["label"], runs[1]["label"] = args.labels
    if len(runs) == 1:
        text, stem = single_markdown(runs[0], Path(args.json[0]).name), args.name or Path(args.json[0]).stem
    else:
        text = compare_markdown(*runs)
        stem = args.name or f"{Path(args.json[1]).stem}_vs_{Path(args.json[0]).stem}"
    if args.note:
        title, rest = text.split("\n", 1)
        text = f"{title}\n\n{args.note}\n{rest}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text + "\n")
    if not args.no_plot:
        plot(runs, out / f"{stem}.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
