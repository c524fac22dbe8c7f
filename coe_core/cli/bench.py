"""``coe bench swap|route|store|runtime|serve``: benchmarks that print JSON figures (performance goals live
here, not in timed tests)."""

from __future__ import annotations

import argparse

from coe_core.cli.common import add_command, print_json
from coe_core.config import CoEConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(subparsers, "bench", cmd_bench, json_output=True, help="benchmarks (JSON figures, not tests)")
    p.add_argument("what", choices=["swap", "route", "store", "runtime", "serve"])
    p.add_argument("--synthetic-gb", type=float, default=1.0, help="swap: size of the synthetic checkpoint")
    p.add_argument("--repeats", type=int, default=5, help="swap, runtime: repeats per measurement")
    p.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="swap, runtime: tokens for the generation comparison (default 64); serve: tokens per turn (default 16)",
    )
    p.add_argument("--no-cold", action="store_true", help="swap: skip the cold page-cache runs")
    p.add_argument("--users", type=int, default=8, help="runtime: concurrent turns for the batch figure (0: skip)")
    p.add_argument("--threads", type=int, default=None, help="runtime: llama.cpp threads (engine and raw alike)")
    p.add_argument(
        "--no-transformers",
        action="store_true",
        help="runtime: skip the transformers runtime (it converts each GGUF to float32 once)",
    )
    p.add_argument("-n", type=int, default=200, help="route: prompts to time; store: turns to log")
    p.add_argument("--levels", default="1,4,8,16", help="serve: concurrent users per level")
    p.add_argument("--turns", type=int, default=2, help="serve: turns per user")
    p.add_argument("--think-s", type=float, default=0.2, help="serve: seconds between a user's turns")
    p.add_argument(
        "--no-tight",
        action="store_true",
        help="serve: keep the configured execution-tier budget (default: room for one expert)",
    )
    p.add_argument(
        "--runtime",
        choices=["transformers", "llama_cpp"],
        default=None,
        help="serve: run every local expert on this runtime (default: as spaces.yaml says)",
    )
    p.add_argument(
        "--expert",
        default=None,
        help="serve: send every turn to this expert (single-expert traffic, compared with the ceiling)",
    )


def cmd_bench(args: argparse.Namespace, config: CoEConfig) -> int:
    # each benchmark imports what it measures only when it runs (torch, llama.cpp, the engine)
    if args.what == "swap":
        from coe_core.bench.swap import bench_swap

        result = bench_swap(
            config,
            synthetic_gb=args.synthetic_gb,
            repeats=args.repeats,
            cold=not args.no_cold,
            generation_tokens=64 if args.tokens is None else args.tokens,
        )
    elif args.what == "runtime":
        from coe_core.bench.runtime import bench_runtime

        result = bench_runtime(
            config,
            tokens=64 if args.tokens is None else args.tokens,
            repeats=args.repeats,
            users=args.users,
            transformers=not args.no_transformers,
            threads=args.threads,
        )
    elif args.what == "serve":
        from coe_core.bench.serve import bench_serve

        result = bench_serve(
            config,
            levels=tuple(int(n) for n in args.levels.split(",")),
            turns=args.turns,
            tokens=16 if args.tokens is None else args.tokens,  # an explicit --tokens 64 is 64
            think_s=args.think_s,
            tight=not args.no_tight,
            runtime=args.runtime,
            expert=args.expert,
        )
    elif args.what == "store":
        from coe_core.bench.store import bench_store

        result = bench_store(n=args.n)
    else:
        from coe_core.routing.bench import bench_route

        result = bench_route(config, n=args.n)
    print_json(result)  # the figures are JSON with or without --json
    return 0
