"""Benchmark linmaps' backends (and PyTorch when installed): ``python bench/run.py [--quick]``.

Prints each case's table on stdout as soon as the case is done, then a summary (progress on
stderr); writes every figure to a JSON file and a chart to a PNG. See docs/benchmarks.md for
what is measured and what each column means. Exit status: 0 when every result was right, 1
when some backend gave a wrong result or failed (reported as ERROR), 2 for bad arguments, 3
with --strict-quiet when the machine was not quiet (the report's WARNING lines say why).
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_JSON = os.path.join(HERE, "results", "latest.json")

OP_ALIASES = {
    "forward": ["forward"],
    "fwd": ["forward"],
    "backward": ["backward"],
    "bwd": ["backward"],
    "fwd+bwd": ["fwd+bwd"],
    "fwdbwd": ["fwd+bwd"],
    "all": ["forward", "backward", "fwd+bwd"],
}


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _ops(text: str) -> tuple:
    ops = []
    for token in (t.strip().lower() for t in text.split(",") if t.strip()):
        if token not in OP_ALIASES:
            raise argparse.ArgumentTypeError(
                f"unknown operation {token!r}; use forward, backward, fwd+bwd (or fwd, bwd, all)"
            )
        ops.extend(op for op in OP_ALIASES[token] if op not in ops)
    if not ops:
        raise argparse.ArgumentTypeError("no operation given")
    return tuple(op for op in OP_ALIASES["all"] if op in ops)  # always in the canonical order


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/run.py",
        description="Time the forward and backward passes of linmaps' linear and bilinear "
        "maps on every backend (cpp, python, and torch when installed), after "
        "checking each result against the NumPy oracle; a training step that alternates "
        "NumPy products and linmaps calls (the mixed cases); and linmaps beside OpenBLAS and "
        "PyTorch in one process (the ceiling cases).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer, shorter samples: the whole suite in well under a minute",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=_usable_cpus(),
        help="threads for every backend and NumPy's BLAS "
        "(default: the CPUs this process may use, %(default)s here)",
    )
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument(
        "--ops",
        type=_ops,
        default=OP_ALIASES["all"],
        help="comma-separated: forward, backward, fwd+bwd (default: all three)",
    )
    parser.add_argument(
        "--cases",
        default=None,
        help="comma-separated filter: a kind ('linear', 'bilinear', 'mixed', 'train-step', "
        "'dask', 'ceiling'), part of a case id ('1024x', 'bilinear-64x512', 'mixed-short', "
        "'ceiling-linear'), or a custom size ('bilinear:8x4x4x2', 'linear:8x16x4', "
        "'mixed:32x64x64x64x8', 'ceiling:8x4x4x2'); see --list-cases",
    )
    parser.add_argument(
        "--backends",
        default=None,
        help="comma-separated (default: the backends registered as default in "
        "bench/linmaps_bench/backends.py; --list-backends shows them); unavailable ones are "
        "reported, not errors. cpp@LEVEL "
        "forces the compiled backend's instruction set (LINMAPS_CPU=LEVEL: baseline, avx2, "
        "avx512, or native in a LINMAPS_NATIVE=ON build); NAME/THREADS runs "
        "NAME with that many threads (cpp/1 next to cpp: the thread scaling in one run)",
    )
    parser.add_argument(
        "--repeat",
        type=_positive_int,
        default=None,
        help="timed samples per measurement, at most (default 15; 5 with "
        "--quick); slow calls stop earlier, after at least 5 (1 with "
        "--quick)",
    )
    parser.add_argument(
        "--json",
        default=DEFAULT_JSON,
        metavar="PATH",
        help="where to write the JSON record (default: bench/results/latest.json)",
    )
    parser.add_argument("--no-json", action="store_true", help="do not write the JSON record")
    parser.add_argument(
        "--plot",
        default=None,
        metavar="PATH",
        help="where to write the PNG chart (default: the JSON path, .png)",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not draw the chart")
    parser.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the peak-memory measurement (one subprocess per backend)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    parser.add_argument(
        "--strict-quiet",
        action="store_true",
        help="exit with status 3 when the machine was not quiet: the reference GEMM changed "
        "by more than 10%% between start and end, or the load average at the start exceeded "
        "what the run explains (the report prints a WARNING line either way)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--list-cases", action="store_true", help="list the cases and exit")
    parser.add_argument(
        "--list-backends", action="store_true", help="list the registered backends and exit"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # Size the BLAS and OpenMP pools before NumPy, linmaps or torch load them (threadpoolctl,
    # when installed, also enforces the count at run time).
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import linmaps_bench
    from linmaps_bench import report
    from linmaps_bench.cases import default_cases

    try:
        cases = linmaps_bench.select_cases(args.cases)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.list_cases:
        defaults = set(linmaps_bench.DEFAULT_CASES)
        listed = cases if args.cases else default_cases(on_request=True)
        for case in listed:
            note = "" if case in defaults else "  (only when named in --cases)"
            print(f"{case.id:28} {case.describe()}{note}")
        return 0
    if args.list_backends:
        for name, backend in linmaps_bench.BACKENDS.items():
            reason = backend.unavailable_reason()
            default = " (default)" if name in linmaps_bench.DEFAULT_BACKENDS else ""
            print(
                f"{name:12} {'available' if reason is None else 'unavailable: ' + reason}{default}"
            )
        return 0
    if args.backends is None:
        backends = list(linmaps_bench.DEFAULT_BACKENDS)
    else:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = []
    for name in backends:
        try:
            linmaps_bench.lookup_backend(name)
        except ValueError:
            unknown.append(name)
    if unknown or not backends:
        print(
            f"error: unknown backend(s) {unknown}; known: {', '.join(linmaps_bench.BACKENDS)}, "
            "cpp@LEVEL (LEVEL: baseline, avx2, avx512, native), NAME/THREADS (e.g. cpp/1)",
            file=sys.stderr,
        )
        return 2

    settings = linmaps_bench.Settings.for_mode(
        args.quick,
        dtype=args.dtype,
        threads=args.threads,
        ops=args.ops,
        repeat=args.repeat,
        measure_memory=not args.no_memory,
        seed=args.seed,
    )
    command = " ".join(["python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])])
    introduced = set()  # case kinds whose reading guide was printed

    def print_header(head):
        print(report.format_header(head) + "\n", flush=True)

    def print_case(case_kind, record, partial):
        text = case_kind.format([record], partial, intro=case_kind.section not in introduced)
        introduced.add(case_kind.section)
        print(text + "\n", flush=True)

    result = linmaps_bench.run_suite(
        cases,
        backends,
        settings,
        progress=not args.no_progress,
        command=command,
        on_start=print_header,
        on_case=print_case,
    )

    print(report.format_end(result))
    print()
    if not args.no_json:
        print(f"JSON record written to {linmaps_bench.write_json(result, args.json)}")
    if not args.no_plot:
        plot_path = args.plot or os.path.splitext(args.json)[0] + ".png"
        try:
            print(f"chart written to {report.plot(result, plot_path)}")
        except ImportError:
            print(
                "chart skipped: matplotlib is not installed "
                "(pip install 'linmaps[bench]' or pip install matplotlib)"
            )
    if linmaps_bench.has_errors(result):
        print(
            "some results were WRONG or failed (ERROR rows above); exit status 1", file=sys.stderr
        )
        return 1
    if args.strict_quiet and not result["quiet"]["quiet"]:
        print("the machine was not quiet (WARNING lines above); exit status 3", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
