#!/usr/bin/env python3
"""torch.topk(g.abs(), k) on the GPU for n = 2^26 float32, k = n/1000: the
reference for issue 8's ">= 3x faster than torch.topk" target (compare with
topk_ms of build/bench/cuda/cuda_topk_bench on the same GPU).

Needs PyTorch with CUDA and a GPU; CI does not run it. Timing: CUDA events
around each call after warm-up, median of the repetitions, in milliseconds.
"""
import argparse
import statistics
import sys

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--log2n", type=int, default=26)
    parser.add_argument("--repetitions", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("torch_topk.py: no CUDA device; nothing timed", file=sys.stderr)
        return 1
    n = 1 << args.log2n
    k = n // 1000
    gen = torch.Generator(device="cuda").manual_seed(1)
    g = torch.randn(n, device="cuda", dtype=torch.float32, generator=gen)
    for _ in range(3):  # warm-up: kernels loaded, caching allocator filled
        torch.topk(g.abs(), k)
    torch.cuda.synchronize()
    times = []
    for _ in range(args.repetitions):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        torch.topk(g.abs(), k)  # abs included: gcomp's top-k selects by magnitude too
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    print(f"device: {torch.cuda.get_device_name()}")
    print(f"torch {torch.__version__}: torch.topk(g.abs(), k) n=2^{args.log2n} k={k}: "
          f"median {statistics.median(times):.3f} ms (min {min(times):.3f}, {args.repetitions} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
