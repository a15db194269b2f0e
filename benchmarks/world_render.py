"""Shapes-world render speed: images per second on one core, against PNG encoding of the same images.

    python benchmarks/world_render.py [--n 2000] [--size 64]

Prints, per stage, images/s in CPU time of this process (what one core delivers, robust to other
load on the machine) and in wall time, and the ratio to the peer measured in the same run: PIL's
PNG encoder on the rendered images (the cost every written sample pays anyway).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402


def timed(fn, n: int) -> tuple[float, float]:
    """(images/s by CPU time, images/s by wall time) of calling fn(i) for i < n."""
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(n):
        fn(i)
    return n / max(time.process_time() - c0, 1e-9), n / max(time.perf_counter() - w0, 1e-9)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    from chorus.world.conditions import conditions_for
    from chorus.world.formats import png_bytes, write_samples
    from chorus.world.render import make_sample, random_scene_sample

    n, size = args.n, args.size
    make_sample(0, 0, size=size)  # warm the texture bank
    rows = []
    rows.append(("make_sample (crop, default)", *timed(lambda i: make_sample(1, i, size=size), n)))
    rows.append(("make_sample (no crop)", *timed(lambda i: make_sample(1, i, size=size, crop=False), n)))
    rows.append(("make_sample + instance map", *timed(lambda i: make_sample(1, i, size=size, with_instances=True), n)))
    rng = np.random.default_rng(0)
    rows.append(("random_scene_sample (evaluator)", *timed(lambda i: random_scene_sample(rng, size=size), n)))
    samples = [make_sample(2, i, size=size, with_instances=True) for i in range(min(n, 500))]
    m = len(samples)
    peer = timed(lambda i: png_bytes(samples[i].image), m)
    rows.append(("conditions (canny, layout, ids)", *timed(lambda i: conditions_for(samples[i]), m)))
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("folder", "wds"):
            k = min(n, 1000)
            c0, w0 = time.process_time(), time.perf_counter()
            write_samples(((f"{i:08d}", make_sample(3, i, size=size)) for i in range(k)), f"{tmp}/{fmt}", fmt=fmt)
            rows.append((f"world make --format {fmt} (render+PNG+write)", k / (time.process_time() - c0),
                         k / (time.perf_counter() - w0)))
    print(f"Shapes world at {size}×{size}, n={n}, torch threads=1, pid CPU time; peer: PIL PNG encode "
          f"{peer[0]:.0f} img/s (cpu)")
    print(f"{'stage':<42}{'img/s (cpu)':>12}{'img/s (wall)':>14}{'× PNG encode':>14}")
    for name, cpu, wall in rows:
        print(f"{name:<42}{cpu:>12.0f}{wall:>14.0f}{cpu / peer[0]:>14.2f}")


if __name__ == "__main__":
    main()
