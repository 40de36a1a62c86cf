"""Time convert.py on a generated MovieLens-shaped ratings.csv: wall time and peak memory.

    python bench/convert_bench.py [--preset ml-20m|small] [--workdir /tmp/ncf-bench]
                                  [--convert_args="--string_ids --validation"]

The input comes from generate.py (preset ml-20m: 20,000,263 ratings of 138,493 users and 26,744
items, heavy-tailed activity and popularity) and is written once into WORKDIR, then reused.
convert.py runs as a subprocess, so its peak resident memory is measured on its own. Targets on
the 2-core development machine, for the ml-20m preset only (the verdict is printed for it alone):
35 s and 2.5 GB (the original's preprocessing: 70 s, 5.0 GB).
"""
import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import cli  # noqa: E402
import generate  # noqa: E402
from child_process import run_child  # noqa: E402

TARGET_SECONDS, TARGET_BYTES = 35, 2.5e9


def bench_input(workdir, preset):
    path = os.path.join(workdir, f"generated-{preset}", "ratings.csv")
    if not os.path.exists(path):
        print(f"writing {path} (once)", flush=True)
        started = time.perf_counter()
        users, items, mean_ratings = generate.PRESETS[preset]
        generate.write_csv(generate.generate_ratings(users, items, mean_ratings, seed=1), path)
        print(f"  {time.perf_counter() - started:.0f} s", flush=True)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(generate.PRESETS), default="ml-20m")
    parser.add_argument("--workdir", default="/tmp/ncf-bench",
                        help="where the input is cached and the output written")
    parser.add_argument("--convert_args", default="",
                        help="more convert.py flags, in one string: the cost of a reader or "
                        "an option on the same input")
    args = parser.parse_args(argv)
    path = bench_input(args.workdir, args.preset)
    output = os.path.join(args.workdir, f"converted-{args.preset}")
    command = [sys.executable, os.path.join(REPO, "convert.py"), "--path", path,
               "--output", output, *args.convert_args.split()]
    print(" ".join(command), flush=True)
    started = time.perf_counter()
    # RUSAGE_CHILDREN's peak covers every child waited for so far: run convert.py from a fresh
    # intermediate process so the figure is convert.py's alone. The probe passes convert.py's
    # exit status on (128 + N for signal N, as a shell does) without a traceback of its own, so
    # the last line of stderr is convert.py's error, or none when a signal (the OOM killer,
    # say) ended it.
    probe = ("import resource, subprocess, sys; status = subprocess.run(sys.argv[1:]).returncode; "
             "status and sys.exit(status if status > 0 else 128 - status); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    finished = run_child("convert.py",
                           [sys.executable, "-c", probe, *command], stdout=subprocess.PIPE)
    seconds = time.perf_counter() - started
    print(finished.stdout.strip().splitlines()[0])
    # ru_maxrss is in KiB on Linux
    peak = int(finished.stdout.strip().splitlines()[-1]) * 1024
    targets = f"the targets {TARGET_SECONDS} s, {TARGET_BYTES / 1e9} GB"
    if args.preset != "ml-20m":
        verdict = f"no verdict: {targets} are for --preset ml-20m"
    elif seconds <= TARGET_SECONDS and peak <= TARGET_BYTES:
        verdict = f"within {targets}"
    else:
        verdict = f"OUTSIDE {targets}"
    print(f"convert.py: {seconds:.1f} s wall, {peak / 1e9:.2f} GB peak RSS ({verdict})")
    return {"preset": args.preset, "seconds": seconds, "peak_rss_gb": peak / 1e9}


if __name__ == "__main__":
    cli.run(main)
