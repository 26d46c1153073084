#!/usr/bin/python3
"""examples/fashion_mnist under MPI (4 ranks) against the same run on 4
in-process workers: with rank-ordered summation the two transports must give
the same training, so every logged step, epoch, byte count, upload count,
training loss and test accuracy must be equal (timings aside).

  mpi_matches_inproc.py OUTDIR TRAINER MPIEXEC [MPIEXEC FLAGS...]
"""
import csv
import subprocess
import sys
from pathlib import Path

COMPARED = ["step", "epoch", "bytes_sent", "uploads", "train_loss", "test_accuracy"]
METHODS = ["dense", "sasg", "jointspar"]


def rows(path):
    with open(path, newline="") as f:
        return [{k: r[k] for k in COMPARED} for r in csv.DictReader(f)]


def main():
    if len(sys.argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    out, trainer, mpiexec = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
        print("skipped: Debian's dataset-fashion-mnist is not installed")
        return 77
    failed = False
    for method in METHODS:
        common = ["--method", method, "--batch", "8", "--epochs", "1", "--train-subset", "2000",
                  "--test-subset", "1000", "--evals", "2", "--quiet"]
        subprocess.run([trainer, *common, "--workers", "4", "--transport", "inproc",
                        "--out", str(out / "inproc")], check=True)
        subprocess.run([*mpiexec, trainer, *common, "--transport", "mpi", "--out", str(out / "mpi")],
                       check=True)
        a, b = rows(out / "inproc" / f"{method}.csv"), rows(out / "mpi" / f"{method}.csv")
        same = len(a) == len(b) and len(a) > 0 and a == b
        print(f"{method}: {'same' if same else 'DIFFERENT'} over {len(a)} logged rows")
        if not same:
            failed = True
            for x, y in zip(a, b):
                if x != y:
                    print(f"  inproc {x}\n  mpi    {y}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
