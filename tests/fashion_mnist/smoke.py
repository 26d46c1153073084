#!/usr/bin/python3
"""Smoke test of one method of examples/fashion_mnist (a ctest per method).

Trains the MLP with 4 in-process workers for one epoch on a 5,000-image
subset, then checks the run's summary: test accuracy >= 0.65 (chance is
0.10) and the bytes and uploads the method's contract implies, computed here
from the model's layer shapes and the wire format (docs/wire.md), not taken
from the trainer.

  smoke.py TRAINER METHOD OUTDIR
"""
import csv
import math
import subprocess
import sys
from pathlib import Path

WORKERS, BATCH, SUBSET = 4, 8, 5000
STEPS = (SUBSET // WORKERS) // BATCH  # one epoch
PERIOD = 10  # local-sgd / ri-sgd averaging period in the smoke run

# The MLP 784-256-128-10: (rows, cols) of each weight, then its bias.
LAYERS = [(256, 784), (256,), (128, 256), (128,), (10, 128), (10,)]
SIZES = [math.prod(s) for s in LAYERS]
N = sum(SIZES)
HEADER = 24  # wire header (docs/wire.md)


# Methods whose every step starts with gcomp's non-finite check: an all-reduce
# of one float per worker (core/nonfinite.hpp), counted in bytes_sent but not
# part of the method's own contract below. (The stale server checks only on
# steps with a worker due; its ratio bounds absorb those 4 bytes.)
GUARDED = {"dense", "topk-ef", "randomk", "qsgd", "terngrad", "sign-ef", "powersgd", "jointspar",
           "jointspar-lars", "divcomm-adam", "lag", "sasg"}
# divcomm-adam reports its foreground traffic without the check's bytes.
FOREGROUND_WITHOUT_FLAG = {"divcomm-adam"}
FLAG_BYTES = 4


def round_nearest(x):
    # gcomp rounds ratio * n to nearest, halves up (std::llround on positives)
    return int(math.floor(x + 0.5))


def kept(ratio):
    return sum(max(1, round_nearest(ratio * n)) for n in SIZES)


def topk_message(ratio):  # header + 8-byte count + (uint32 index, float value) per kept element
    return HEADER + 8 + kept(ratio) * 8


def check(method, s):
    failures = []

    def expect(what, ok, detail):
        if not ok:
            failures.append(f"{what}: {detail}")

    acc = float(s["final_test_accuracy"])
    steps = int(s["steps"])
    flag = steps * WORKERS * FLAG_BYTES if method in GUARDED else 0
    bytes_sent = int(float(s["bytes_sent"])) - flag
    uploads = int(float(s["uploads"]))
    fg = int(float(s["foreground_bytes"])) - (0 if method in FOREGROUND_WITHOUT_FLAG else flag)
    dense = steps * WORKERS * N * 4
    all_uploads = steps * WORKERS
    expect("steps", steps == STEPS, f"{steps} != {STEPS}")
    expect("parameters", int(s["parameters"]) == N, f"{s['parameters']} != {N}")
    expect("accuracy", acc >= 0.65, f"{acc:.4f} < 0.65")
    ratio = bytes_sent / dense

    if method == "dense":
        expect("bytes", bytes_sent == dense, f"{bytes_sent} != {dense} (all-reduce of every parameter)")
        expect("uploads", uploads == all_uploads, f"{uploads} != {all_uploads}")
    elif method in ("topk-ef", "sasg"):
        per = topk_message(0.01)
        if method == "topk-ef":
            expect("uploads", uploads == all_uploads, f"{uploads} != {all_uploads}")
        else:
            expect("uploads", 0 < uploads <= all_uploads, f"{uploads} not in (0, {all_uploads}]")
        expect("bytes", bytes_sent == uploads * per, f"{bytes_sent} != {uploads} x {per}")
    elif method == "randomk":  # shared support: all-reduce of the kept values only
        per = kept(0.25) * 4
        expect("bytes", bytes_sent == all_uploads * per, f"{bytes_sent} != {all_uploads} x {per}")
        expect("uploads", uploads == all_uploads, f"{uploads} != {all_uploads}")
    elif method in ("qsgd", "stale"):  # 3 bits + sign per element, a float norm per 512
        lo, hi = 4 / 32, (4 + 32 / 512) / 32 + 0.002
        expect("bytes", lo <= ratio <= hi, f"{ratio:.4f} of dense not in [{lo:.4f}, {hi:.4f}]")
        expect("uploads", uploads == all_uploads, f"{uploads} != {all_uploads}")
    elif method == "terngrad":  # 2 bits per element, a float scale per 512
        lo, hi = 2 / 32, (2 + 32 / 512) / 32 + 0.002
        expect("bytes", lo <= ratio <= hi, f"{ratio:.4f} of dense not in [{lo:.4f}, {hi:.4f}]")
        expect("uploads", uploads == all_uploads, f"{uploads} != {all_uploads}")
    elif method == "sign-ef":  # 1 bit per element, a float scale per layer
        lo, hi = 1 / 32, 1 / 32 + 0.002
        expect("bytes", lo <= ratio <= hi, f"{ratio:.4f} of dense not in [{lo:.4f}, {hi:.4f}]")
        expect("uploads", uploads == all_uploads, f"{uploads} != {all_uploads}")
    elif method == "powersgd":  # rank 2 factors of each weight, biases as they are
        floats = sum(2 * (l[0] + l[1]) if len(l) == 2 else l[0] for l in LAYERS)
        lo, hi = all_uploads * floats * 4, all_uploads * (floats * 4 + 512)
        expect("bytes", lo <= bytes_sent <= hi, f"{bytes_sent} not in [{lo}, {hi}]")
        expect("uploads", uploads == all_uploads, f"{uploads} != {all_uploads}")
    elif method in ("jointspar", "jointspar-lars"):
        # Only the active modules' parameters travel, as floats, no indices:
        # the per-step total is a sum of module sizes (1 to 3 modules of 3).
        modules = [SIZES[0] + SIZES[1], SIZES[2] + SIZES[3], SIZES[4] + SIZES[5]]
        expect("bytes", bytes_sent % (4 * WORKERS) == 0, f"{bytes_sent} not whole floats per worker")
        lo, hi = all_uploads * min(modules) * 4, dense
        expect("bytes", lo <= bytes_sent < hi, f"{bytes_sent} not in [{lo}, {hi})")
        expect("uploads", uploads == all_uploads, f"{uploads} != {all_uploads}")
    elif method in ("local-sgd", "ri-sgd"):  # one parameter all-reduce per period
        rounds = STEPS // PERIOD
        expect("uploads", uploads == WORKERS * rounds, f"{uploads} != {WORKERS} x {rounds}")
        expect("bytes", bytes_sent == uploads * N * 4, f"{bytes_sent} != {uploads} x {N * 4}")
    elif method == "lag":  # a dense message per upload, skips send nothing
        per = HEADER + N * 4
        expect("uploads", 0 < uploads <= all_uploads, f"{uploads} not in (0, {all_uploads}]")
        expect("bytes", bytes_sent == uploads * per, f"{bytes_sent} != {uploads} x {per}")
    elif method == "divcomm-adam":  # foreground: a shared block of round(n / 64) floats
        per = round_nearest(N / 64) * 4
        expect("foreground bytes", fg == all_uploads * per, f"{fg} != {all_uploads} x {per}")
        expect("uploads", uploads == all_uploads, f"{uploads} != {all_uploads}")
    else:
        failures.append(f"no contract for method {method}")
    return failures


def main():
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    trainer, method, out = sys.argv[1:]
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
        print("skipped: Debian's dataset-fashion-mnist is not installed")
        return 77
    args = [trainer, "--method", method, "--workers", str(WORKERS), "--batch", str(BATCH),
            "--epochs", "1", "--train-subset", str(SUBSET), "--test-subset", "2000",
            "--evals", "1", "--period", str(PERIOD), "--out", out, "--quiet"]
    print(" ".join(args), flush=True)
    subprocess.run(args, check=True)
    with open(Path(out) / f"{method}.summary.csv", newline="") as f:
        summary = next(csv.DictReader(f))
    failures = check(method, summary)
    for f in failures:
        print(f"FAILED {method}: {f}")
    print(f"{method}: {'ok' if not failures else 'FAILED'} (accuracy {summary['final_test_accuracy']}, "
          f"{int(float(summary['bytes_sent']))} bytes, {summary['uploads']} uploads)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
