"""The ``coe`` command. Subcommands print JSON with ``--json`` (other tools read it), readable text otherwise."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading

from coe_core.config import ConfigError, load_config


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _engine(config, *, routing="auto", store="auto"):
    from coe_core.engine import CoE

    return CoE(config, routing=routing, store=store)


def _gb(n) -> str:
    return f"{n / 1e9:.2f} GB" if n else "-"


# -- coe experts ----------------------------------------------------------------------------------------
def cmd_experts(args, config) -> int:
    coe = _engine(config, routing=None, store=None)
    if args.prepare:
        coe.tiers.prepare()
    info = coe.experts_info()
    if args.json:
        _print_json(info)
        return 0
    print(f"profile {info['profile']}, execution tier {info['exec_tier']}")
    for name, t in info["tiers"].items():
        extra = f"budget {_gb(t['budget'])} used {_gb(t['used'])} free {_gb(t['free'])}" if t["exists"] else "absent"
        print(f"  tier {name:<5} {extra}")
    for e in info["experts"]:
        params = f"{e['params'] / 1e6:.0f}M" if e["params"] else "?"
        runtime = e.get("runtime") or "remote"
        print(f"  {e['id']:<28} {e['state']:<12} {runtime:<12} params {params:<6} {_gb(e['bytes']):<9} {e['source']}")
        if e["reason"]:
            print(f"      {e['reason']}")
        if e.get("runtime_note"):
            print(f"      {e['runtime_note']}")
        if e.get("remote"):
            health = e["remote"]["health"]
            status = {True: "answering", False: f"DOWN: {health['error']}", None: "not checked yet"}[health["ok"]]
            print(f"      remote model {e['remote']['model']} at {e['remote']['base_url']}: {status}")
    return 0


# -- coe chat -------------------------------------------------------------------------------------------
def cmd_chat(args, config) -> int:
    from coe_core.events import Notice, Queued, RouteDecision, SwapEvent, TextChunk, TurnDone

    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    overrides = {"expert": args.expert, "category": args.category}
    coe = _engine(config, routing=None if args.no_router else "auto")
    cancel = threading.Event()
    out = {"response": "", "swaps": [], "notices": []}
    try:
        for event in coe.chat(prompt, overrides, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, cancel=cancel, client="cli"):
            if isinstance(event, RouteDecision):
                out["route"] = {k: event.to_dict()[k] for k in ("category", "probabilities", "confidence",
                                                                "fallback", "expert", "reason", "latency_ms")}
                out["expert"] = event.expert
                if not args.json:
                    print(f"[route] {event.explanation or event.reason}", file=sys.stderr)
            elif isinstance(event, SwapEvent):
                out["swaps"].append(event.to_dict())
                if not args.json:
                    print(f"[swap] {event.expert} {event.src}->{event.dst} {_gb(event.bytes)} in "
                          f"{event.seconds:.3f}s ({event.gbps:.1f} GB/s)", file=sys.stderr)
            elif isinstance(event, Queued):
                if not args.json:
                    print(f"[queue] {event.message}", file=sys.stderr)
            elif isinstance(event, Notice):
                out["notices"].append(event.message)
                if not args.json:
                    print(f"[note] {event.message}", file=sys.stderr)
            elif isinstance(event, TextChunk) and not args.json:
                print(event.text, end="", flush=True)
            elif isinstance(event, TurnDone):
                s = event.stats
                out.update(response=s.response, expert=s.expert, status=s.status, error=s.error,
                           ttft_s=s.ttft_s, total_s=s.total_s, prompt_tokens=s.prompt_tokens,
                           new_tokens=s.new_tokens, tokens_per_s=s.tokens_per_s, truncated=s.truncated,
                           interaction_id=s.interaction_id, queue_s=round(s.queue_s, 3))
    except KeyboardInterrupt:
        cancel.set()
        print("\n[cancelled]", file=sys.stderr)
        return 130
    finally:
        coe.close()
    if args.json:
        _print_json(out)
    else:
        print()
        ttft = f"{out['ttft_s']:.2f}s" if out.get("ttft_s") is not None else "-"
        print(f"[done] {out.get('status')} expert={out.get('expert')} ttft={ttft} "
              f"tokens={out.get('new_tokens')} ({out.get('tokens_per_s', 0):.1f} tok/s) "
              f"interaction={out.get('interaction_id')}", file=sys.stderr)
    if out.get("status") == "error":
        print(f"error: {out.get('error')}", file=sys.stderr)
        return 1
    return 0


# -- coe bench ------------------------------------------------------------------------------------------
def cmd_bench(args, config) -> int:
    if args.what == "swap":
        from coe_core.bench.swap import bench_swap

        result = bench_swap(config, synthetic_gb=args.synthetic_gb, repeats=args.repeats,
                            cold=not args.no_cold, generation_tokens=args.tokens)
    elif args.what == "runtime":
        from coe_core.bench.runtime import bench_runtime

        result = bench_runtime(config, tokens=args.tokens, repeats=args.repeats, users=args.users,
                               transformers=not args.no_transformers, threads=args.threads)
    elif args.what == "serve":
        from coe_core.bench.serve import bench_serve

        result = bench_serve(config, levels=tuple(int(n) for n in args.levels.split(",")), turns=args.turns,
                             tokens=args.tokens if args.tokens != 64 else 16, think_s=args.think_s,
                             tight=not args.no_tight)
    elif args.what == "store":
        from coe_core.bench.store import bench_store

        result = bench_store(n=args.n)
    else:
        from coe_core.routing.cli import bench_route

        result = bench_route(config, n=args.n)
    if args.json:
        _print_json(result)
    else:
        print(json.dumps(result, indent=2, default=str))
    return 0


# -- coe serve ------------------------------------------------------------------------------------------
def cmd_serve(args, config) -> int:
    if args.no_ui:
        from coe_core.api.__main__ import serve_api

        return serve_api(config, args.host, args.port)
    from app.__main__ import serve

    return serve(config, host=args.host, port=args.port, share=args.share)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coe", description="CoE Playground: a Composition of Experts.")
    parser.add_argument("--config", help="path of spaces.yaml (default: ./spaces.yaml or $COE_CONFIG)")
    parser.add_argument("--data-dir", help="data directory (overrides spaces.yaml and $COE_DATA_DIR)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("experts", help="list experts, their tiers and state")
    p.add_argument("--json", action="store_true")
    p.add_argument("--prepare", action="store_true", help="materialise and verify every expert first")
    p.set_defaults(func=cmd_experts)

    p = sub.add_parser("chat", help="answer one prompt (streams to the terminal)")
    p.add_argument("prompt", help="the prompt ('-' reads stdin)")
    p.add_argument("--expert", help="force this expert")
    p.add_argument("--category", help="force this category")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--no-router", action="store_true", help="skip the router (default expert or --expert)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("bench", help="benchmarks (JSON figures, not tests)")
    p.add_argument("what", choices=["swap", "route", "store", "runtime", "serve"])
    p.add_argument("--json", action="store_true")
    p.add_argument("--synthetic-gb", type=float, default=1.0, help="swap: size of the synthetic checkpoint")
    p.add_argument("--repeats", type=int, default=5, help="swap, runtime: repeats per measurement")
    p.add_argument("--tokens", type=int, default=64,
                   help="swap, runtime: tokens for the generation comparison; serve: tokens per turn (default 16)")
    p.add_argument("--no-cold", action="store_true", help="swap: skip the cold page-cache runs")
    p.add_argument("--users", type=int, default=8, help="runtime: concurrent turns for the batch figure (0: skip)")
    p.add_argument("--threads", type=int, default=None, help="runtime: llama.cpp threads (engine and raw alike)")
    p.add_argument("--no-transformers", action="store_true",
                   help="runtime: skip the transformers runtime (it converts each GGUF to float32 once)")
    p.add_argument("-n", type=int, default=200, help="route: prompts to time; store: turns to log")
    p.add_argument("--levels", default="1,4,8,16", help="serve: concurrent users per level")
    p.add_argument("--turns", type=int, default=2, help="serve: turns per user")
    p.add_argument("--think-s", type=float, default=0.2, help="serve: seconds between a user's turns")
    p.add_argument("--no-tight", action="store_true",
                   help="serve: keep the configured execution-tier budget (default: room for one expert)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="start the playground and the OpenAI-compatible /v1 API on one port "
                                      "(same as python -m app)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also a public gradio.live link (playground only)")
    p.add_argument("--no-ui", action="store_true", help="serve the /v1 API and probes only (python -m coe_core.api)")
    p.set_defaults(func=cmd_serve)

    from coe_core.routing.cli import register as register_routing
    from coe_core.store.cli import register as register_store

    register_routing(sub)
    register_store(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        overrides = {"data_dir": args.data_dir} if args.data_dir else {}
        config = load_config(args.config, **overrides)
        return int(args.func(args, config) or 0)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, FileNotFoundError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
