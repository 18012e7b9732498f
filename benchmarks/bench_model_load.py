"""First (provisioning) and later load times of a registry model, in one process, on a fresh cache.

    python benchmarks/bench_model_load.py [--model smollm2-135m] [--repeats 3]
"""
import argparse
import os
import tempfile
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ["DISSECT_UNLEARNING_CACHE"] = tempfile.mkdtemp(prefix="bench-load-")
    from dissect_unlearning import cache, models

    t0 = time.perf_counter()
    models.load(args.model)
    first = time.perf_counter() - t0
    later = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        models.load(args.model)
        later.append(time.perf_counter() - t0)
    size = cache.folder_size(models.provisioned_path(args.model))
    print(f"{args.model}: first load (provision + load) {first:.1f} s; later loads "
          f"{', '.join(f'{t:.2f}' for t in later)} s; checkpoint {size / 2**20:.0f} MiB; "
          f"first/later ratio {first / min(later):.0f}x")


if __name__ == "__main__":
    main()
