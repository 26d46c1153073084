#!/usr/bin/python3
"""Results table and plots for the Fashion-MNIST runs of examples/fashion_mnist.

  scripts/fashion_mnist_report.py DIR [--target ACC] [--baseline RUN]
                                      [--plots DIR2] [--markdown]

DIR holds what the trainer wrote: for each run, <run>.csv (one row per
evaluation, cumulative counters) and <run>.summary.csv (one data row).
Every run with a summary is reported; a <run>.csv without one is skipped with
a warning.

The table has one row per run, in the order of METHODS below. Ratios are
relative to the baseline: the run whose method is "dense", or --baseline RUN
(by run name); without one they print as "-". Time to target is modeled:
compute_s + modeled_comm_s (at the link in the run's summary) at the first
evaluation whose test accuracy reaches the target. The target defaults to the
baseline's final accuracy minus 0.01 (without a baseline: the lowest final
accuracy of all runs).

Plots (PNG, into --plots DIR2, default DIR): accuracy_vs_step.png,
accuracy_vs_bytes.png and accuracy_vs_modeled_time.png.

Errors (missing DIR, no runs, a CSV without a required column or with a bad
value) go to stderr with exit status 2.
"""
import argparse
import csv
import sys
from pathlib import Path

METHODS = ["dense", "topk-ef", "randomk", "qsgd", "terngrad", "sign-ef", "powersgd", "jointspar",
           "jointspar-lars", "local-sgd", "ri-sgd", "stale", "lag", "sasg", "divcomm-adam"]
CURVE = ["step", "epoch", "wall_s", "compute_s", "backward_s", "modeled_comm_s", "bytes_sent",
         "uploads", "train_loss", "test_accuracy"]
SUMMARY = ["run", "method", "model", "workers", "transport", "link", "epochs", "steps", "batch", "lr",
           "seed", "final_test_accuracy", "bytes_sent", "uploads", "backward_s_per_step", "compute_s",
           "modeled_comm_s", "wall_s"]
TEXT = {"run", "method", "model", "transport", "link"}  # summary columns that stay strings


def fail(message):
    print(f"fashion_mnist_report.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def read_csv(path, columns):
    """Rows of a CSV as dicts, numbers as floats; checks the header and every value."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        for c in columns:
            if c not in header:
                fail(f"{path}: missing column '{c}'")
        rows = []
        for row in reader:
            out = dict(row)
            for c in columns:
                if c in TEXT:
                    continue
                try:
                    out[c] = float(row[c])
                except (TypeError, ValueError):
                    fail(f"{path}, line {reader.line_num}: column '{c}' is not a number: {row[c]!r}")
            rows.append(out)
    if not rows:
        fail(f"{path}: no data rows")
    return rows


def load_runs(directory):
    runs = []
    for summary_path in sorted(directory.glob("*.summary.csv")):
        name = summary_path.name[: -len(".summary.csv")]
        curve_path = directory / f"{name}.csv"
        if not curve_path.is_file():
            fail(f"{summary_path} has no curve file {curve_path}")
        summary = read_csv(summary_path, SUMMARY)
        if len(summary) != 1:
            fail(f"{summary_path}: expected one data row, found {len(summary)}")
        runs.append({"name": name, "s": summary[0], "curve": read_csv(curve_path, CURVE)})
    for path in sorted(directory.glob("*.csv")):
        if not path.name.endswith(".summary.csv") and not path.with_suffix(".summary.csv").exists():
            print(f"fashion_mnist_report.py: warning: skipping {path}: no {path.stem}.summary.csv",
                  file=sys.stderr)
    if not runs:
        fail(f"no runs found in {directory} (expected <run>.csv and <run>.summary.csv)")
    order = {m: i for i, m in enumerate(METHODS)}
    runs.sort(key=lambda r: (order.get(r["s"]["method"], len(METHODS)), r["name"]))
    return runs


def label(run):
    method = run["s"]["method"]
    return method if run["name"] == method else f"{method} ({run['name']})"


def reach(run, target):
    """(steps, modeled seconds) at the first evaluation with accuracy >= target, or None."""
    for row in run["curve"]:
        if row["test_accuracy"] >= target:
            return int(row["step"]), row["compute_s"] + row["modeled_comm_s"]
    return None


def ratio(value, base):
    if base is None or not base:
        return "-"
    return f"x{value / base:.3g}"


def table(runs, base, target, markdown, show_link):
    b = base["s"] if base else None
    rel = f"x {base['name']}" if base else "x dense"
    headers = ["method", "test acc", f"bytes ({rel})", "uploads", f"uploads ({rel})",
               f"backward/step ({rel})", "steps to target", "modeled time to target (s)"]
    if show_link:
        headers.append("link")
    rows = []
    for r in runs:
        s = r["s"]
        hit = reach(r, target)
        row = [label(r), f"{s['final_test_accuracy']:.4f}",
               ratio(s["bytes_sent"], b and b["bytes_sent"]),
               f"{int(s['uploads'])}", ratio(s["uploads"], b and b["uploads"]),
               ratio(s["backward_s_per_step"], b and b["backward_s_per_step"]),
               str(hit[0]) if hit else "not reached", f"{hit[1]:.2f}" if hit else "not reached"]
        if show_link:
            row.append(s["link"])
        rows.append(row)
    if markdown:
        lines = ["| " + " | ".join(headers) + " |",
                 "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    else:
        widths = [max(len(x) for x in col) for col in zip(headers, *rows)]

        def fmt(cells):
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
        lines = [fmt(headers), "  ".join("-" * w for w in widths)] + [fmt(row) for row in rows]
    return "\n".join(lines)


def unique(runs, key):
    values = {r["s"][key] for r in runs}
    return ", ".join(f"{v:g}" if isinstance(v, float) else v for v in sorted(values))


def plots(runs, target, out_dir, link):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"Fashion-MNIST, {unique(runs, 'model')}, {unique(runs, 'workers')} workers"
    colors = plt.get_cmap("tab20").colors
    markers = "osD^vP*Xh<>p"
    figures = [
        ("accuracy_vs_step.png", "optimizer steps", lambda row: row["step"], False),
        ("accuracy_vs_bytes.png", "bytes sent, all workers (MB)", lambda row: row["bytes_sent"] / 1e6, True),
        ("accuracy_vs_modeled_time.png", f"modeled time at {link} (s)",
         lambda row: row["compute_s"] + row["modeled_comm_s"], False),
    ]
    written = []
    for filename, xlabel, x_of, log_x in figures:
        fig, ax = plt.subplots(figsize=(8, 5))
        for i, r in enumerate(runs):
            points = [(x_of(row), row["test_accuracy"]) for row in r["curve"]]
            if log_x:
                points = [p for p in points if p[0] > 0]  # log scale: drop a zero-bytes start
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker=markers[i % len(markers)], markersize=4, linewidth=1.4,
                        color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20], label=label(r))
        ax.axhline(target, linestyle="--", color="gray", linewidth=1, label=f"target {target:.4f}")
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(str(path))
    return written


def main():
    p = argparse.ArgumentParser(description="Results table and plots for Fashion-MNIST runs.")
    p.add_argument("dir", metavar="DIR", help="directory with <run>.csv and <run>.summary.csv files")
    p.add_argument("--target", type=float, metavar="ACC",
                   help="test accuracy for steps/time to target (default: baseline's final - 0.01)")
    p.add_argument("--baseline", metavar="RUN", help="run name of the baseline (default: the dense run)")
    p.add_argument("--plots", metavar="DIR2", help="where the PNGs go (default: DIR)")
    p.add_argument("--markdown", action="store_true", help="print a GitHub markdown table")
    a = p.parse_args()

    directory = Path(a.dir)
    if not directory.is_dir():
        fail(f"no such directory: {directory}")
    runs = load_runs(directory)
    if a.baseline:
        base = next((r for r in runs if r["name"] == a.baseline), None)
        if base is None:
            fail(f"--baseline {a.baseline}: no such run (runs: {', '.join(r['name'] for r in runs)})")
    else:
        base = next((r for r in runs if r["s"]["method"] == "dense"), None)
    if a.target is not None:
        target, why = a.target, "--target"
    elif base:
        target = base["s"]["final_test_accuracy"] - 0.01
        why = f"{base['name']}'s final accuracy - 0.01"
    else:
        target, why = min(r["s"]["final_test_accuracy"] for r in runs), "lowest final accuracy, no baseline"

    links = unique(runs, "link")
    mixed = len({r["s"]["link"] for r in runs}) > 1
    print(f"target test accuracy: {target:.4f} ({why})")
    print(f"baseline: {base['name'] if base else 'none (ratios print as -)'}")
    print(f"link (modeled time): {links}" + (" (per run, see the link column)" if mixed else ""))
    print()
    print(table(runs, base, target, a.markdown, mixed))
    print()
    link = "each run's link" if mixed else links
    for path in plots(runs, target, Path(a.plots) if a.plots else directory, link):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
