"""Every CPU benchmark at the ml-20m shape, summed up in one markdown table.

    python bench/run.py            # ml-20m shape: about 5 minutes on a 2-core machine
    python bench/run.py --quick    # a small shape, under a minute (smoke test)
    make bench / make bench-quick

Runs, in order: convert.py on generated ratings (bench/convert_bench.py), training and
evaluation throughput with peak memory against a faithful baseline of the original
and against the machine's own matrix-product rate, in float32 and in bfloat16 autocast where
the CPU has bf16 units (bench/train_bench.py), and the forward-pass benchmark (inference.py).
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import cli  # noqa: E402
import convert_bench  # noqa: E402
import inference  # noqa: E402
import train_bench  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, for smoke tests")
    parser.add_argument("--workdir", default="/tmp/ncf-bench",
                        help="where generated inputs are cached")
    args = parser.parse_args(argv)

    convert = convert_bench.main(["--preset", "small" if args.quick else "ml-20m",
                                  "--workdir", args.workdir])
    training = train_bench.main(["--quick"] if args.quick else [])
    shape = ["--n_users", "2000", "--n_items", "1000"] if args.quick else []
    big_batch = 65536 if args.quick else 2 ** 20
    forward = inference.main([*shape, "--device", "cpu", "--precision", "fp32",
                              "--batch_sizes", "1024", str(big_batch), "--num_batches",
                              "3" if args.quick else "5", "--warmup_batches", "1",
                              "--log_path", os.path.join(args.workdir, "inference.json")])

    rows = [("convert.py, wall time", f"{convert['seconds']:.1f} s"),
            ("convert.py, peak RSS", f"{convert['peak_rss_gb']:.2f} GB")]
    for result in training:
        variant = result["variant"]
        rows += [(f"training, {variant}", f"{result['train_samples_per_s']:,.0f} samples/s"),
                 (f"evaluation, {variant}", f"{result['eval_samples_per_s']:,.0f} samples/s"),
                 (f"peak RSS, {variant}", f"{result['peak_rss_gb']:.2f} GB"),
                 (f"training, {variant}, share of the matrix-product limit",
                  f"{result['matmul_limit_share']:.0%} of "
                  f"{result['matmul_limit_samples_per_s']:,.0f} samples/s ({result['precision']} "
                  f"products at {result['matmul_gflops']:,.0f} GFLOP/s)")]
    for result in forward:
        rows.append((f"inference fp32, batch {result['batch_size']:,}",
                     f"{result['throughput']:,.0f} samples/s, mean {result['latency_mean_ms']:.1f} ms"))
    print()
    print(f"{'quick' if args.quick else 'ml-20m'} shape; {inference.cpu_model()}, "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| benchmark | result |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return rows


if __name__ == "__main__":
    cli.run(main)
