"""Routing subcommands of ``coe``: route, train-router, retrain, eval-router, calibrate-router,
router-versions, mapping, eval-experts.

Each handler takes ``(args, config)`` and returns an exit code; ``--json`` prints the JSON shape other
tools read, otherwise a readable table. They live here, above the engine, because ``route``, ``mapping`` and
``eval-experts`` use the engine (available experts and their sizes, reference log-likelihoods), and routing
itself must not import it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from coe_core.cli.common import add_command, print_json, say
from coe_core.config import CoEConfig, parse_params
from coe_core.routing.metrics import format_confusion


def _service(config: CoEConfig, *, engine: bool = False, store: bool = False):
    """The routing service; with ``engine`` the engine's (it knows which experts are available and
    their sizes, and the logged traffic). Without it (or if the engine cannot start) a bare one, with
    the interaction log when ``store`` (versions record themselves there). Returns (service, closer)."""
    from coe_core.routing.service import RoutingService

    if engine:
        try:
            from coe_core.engine import CoE

            coe = CoE(config, progress=False)
            if isinstance(coe.routing, RoutingService):  # what routing="auto" builds; the commands need all of it
                return coe.routing, coe
        except Exception as exc:  # noqa: BLE001 - routing must work even when the engine cannot start
            say(f"note: engine unavailable ({exc}); routing with the score table's sizes and all experts")
    log = _store(config) if store else None
    return RoutingService(config, progress=say, store=log), log


def _store(config: CoEConfig):
    try:
        from coe_core.store.store import Store

        return Store.from_config(config)
    except Exception as exc:  # noqa: BLE001 - the store is optional for these commands
        say(f"note: store unavailable ({exc}); versions are recorded in the data dir only")
        return None


def _fmt_params(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _metrics_table(m: dict[str, Any]) -> str:
    lines = [
        f"n {m['n']}  accuracy {m['accuracy']:.3f}  macro-F1 {m['macro_f1']:.3f}"
        + (f"  fallback rate {m['fallback_rate']:.3f}" if "fallback_rate" in m else ""),
        f"{'category':<12} {'prec':>6} {'recall':>6} {'f1':>6} {'n':>5}",
    ]
    for cat, r in m["per_category"].items():
        lines.append(f"{cat:<12} {r['precision']:>6.3f} {r['recall']:>6.3f} {r['f1']:>6.3f} {r['n']:>5}")
    lines += ["confusion (rows true, columns predicted):", format_confusion(m["confusion"])]
    return "\n".join(lines)


# -- coe route -------------------------------------------------------------------------------------------
def cmd_route(args, config) -> int:
    service, _ = _service(config, engine=not args.no_engine)
    service.warm_up()  # load first, so latency_ms is the warm routing time
    d = service.decide(
        [{"role": "user", "content": args.prompt}],
        {k: v for k, v in {"category": args.category, "expert": args.expert}.items() if v},
    )
    out = {
        "category": d.category,
        "probabilities": d.probabilities,
        "confidence": d.confidence,
        "fallback": d.fallback,
        "expert": d.expert,
        "reason": d.reason,
        "latency_ms": d.latency_ms,
        "threshold": d.threshold,
        "router_version": d.router_version,
        "explanation": d.explanation,
    }
    if args.json:
        print_json(out)
        return 0
    print(d.explanation)
    for cat, p in sorted(d.probabilities.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:<12} {p:6.3f} {'#' * int(round(p * 30))}")
    print(
        f"category {d.category}  expert {d.expert}  reason {d.reason}  confidence {d.confidence:.3f}  "
        f"threshold {d.threshold}  {d.latency_ms:.1f} ms  (router {d.router_version})"
    )
    return 0


# -- coe train-router / retrain --------------------------------------------------------------------------
def cmd_train_router(args, config) -> int:
    service, log = _service(config, store=True)
    try:
        meta = service.train(activate=True)  # records itself in the log
    finally:
        if log is not None:
            log.close()
    out = {
        "version": meta["id"],
        "active": True,
        "classifier": meta["classifier"],
        "metrics": meta["metrics"],
        "samples": meta["samples"],
        "parent": meta["parent"],
    }
    if args.json:
        print_json(out)
        return 0
    print(f"trained router {meta['id']} (active): {meta['classifier']['name']}, {meta['classifier']['why']}")
    print(_metrics_table(meta["metrics"]))
    return 0


def cmd_retrain(args, config) -> int:
    service, log = _service(config, store=True)
    try:
        result = service.retrain_from_log(force=args.force)
    finally:
        if log is not None:
            log.close()
    if args.json:
        print_json(result)
        return 0
    verb = "promoted" if result["promoted"] else "NOT promoted"
    print(f"candidate {result['candidate']} {verb}: {result['why']}")
    print(f"samples by source: {result['samples']['by_source']}  (held-out prompts compared: {result['heldout_n']})")
    print("candidate on the held-out set:")
    print(_metrics_table(result["candidate_metrics"]))
    return 0


# -- coe eval-router -------------------------------------------------------------------------------------
def cmd_eval_router(args, config) -> int:
    from coe_core.routing.training import evaluate, expand_paths, load_labelled_files

    service, _ = _service(config)
    router = service.router()
    r = config.router
    data = load_labelled_files(
        expand_paths(args.files, lambda p: Path(p)),
        config.categories,
        source="eval",
        keep_labels=[config.fallback_category],
        context_turns=r.context_turns,
        context_chars=r.context_chars,
    )
    if not data.examples:
        raise ValueError(
            f"{' '.join(args.files)} has no prompts labelled with a category of this taxonomy "
            f"({', '.join(config.all_categories)}); labels found: {data.outside_taxonomy}"
        )
    metrics = evaluate(router, data.examples, with_fallback=True)
    out = {
        **metrics,
        "outside_taxonomy": data.outside_taxonomy,
        "router_version": router.version_id,
        "files": args.files,
    }
    evaluated = {p.resolve() for p in expand_paths(args.files, lambda p: Path(p))}
    calibrated_on = {p.resolve() for p in expand_paths(r.dev_data, config.resolve_path)} if r.dev_data else set()
    if evaluated & calibrated_on:
        # the temperature and threshold were fitted on (some of) these prompts: say so, and give the
        # cross-fitted ECE the version keeps (each half's temperature fitted on the other half)
        stored = router.artifact.meta.get("dev_metrics") or {}
        out["in_sample"] = True
        out["ece_crossfit"] = stored.get("ece")
    if args.json:
        print_json(out)
        return 0
    print(
        f"router {router.version_id} on {' '.join(args.files)} (threshold {router.threshold:.3f}; a fallback to "
        f"{config.fallback_category} counts as wrong unless labelled so)"
    )
    print(_metrics_table(out))
    caught = out["wrong_caught_by_fallback"]
    print(
        f"accuracy without fallback {out['accuracy_without_fallback']:.3f}  ECE {out['ece']:.3f}  "
        f"wrong top choices caught by the fallback {'-' if caught is None else f'{caught:.3f}'}"
    )
    if out.get("in_sample"):
        print(
            f"note: the router's temperature and threshold were calibrated on these prompts (in-sample); "
            f"cross-fitted ECE kept in the version: {out['ece_crossfit']}"
        )
    print("slices:")
    for name, row in out["slices"].items():
        print(f"  {name:<16} {row['accuracy']:.3f}  (n {row['n']})")
    print("reliability (confidence bin: n, mean confidence, accuracy):")
    for row in out["reliability"]:
        if row["n"]:
            print(f"  {row['bin']}: {row['n']:>5}  {row['confidence']:.3f}  {row['accuracy']:.3f}")
    if data.outside_taxonomy:
        print(f"skipped labels outside the taxonomy: {data.outside_taxonomy}")
    return 0


# -- coe calibrate-router --------------------------------------------------------------------------------
def cmd_calibrate_router(args, config) -> int:
    service, _ = _service(config)
    result = service.calibrate(args.target)
    if args.json:
        print_json(result)
        return 0
    state = "reaches" if result["achieved"] else "does NOT reach (best precision shown)"
    print(
        f"threshold {result['threshold']:.4f} written into router {result['router_version']}: "
        "held-out routed "
        f"precision {result['precision']:.3f} {state} the target {result['target_precision']}, coverage "
        f"{result['coverage']:.3f} ({result['routed']}/{result['n']} routed, the rest falls back)"
    )
    return 0


# -- coe router-versions ---------------------------------------------------------------------------------
def cmd_router_versions(args, config) -> int:
    service, log = _service(config, store=bool(args.activate))
    try:
        if args.activate:
            service.activate(args.activate)  # records itself in the log
    finally:
        if log is not None:
            log.close()
    versions = [
        {
            "id": m["id"],
            "active": m["active"],
            "trained_at": m["trained_at"],
            "classifier": m["classifier"]["name"],
            "macro_f1": m["metrics"]["macro_f1"],
            "threshold": m.get("threshold"),
            "samples": m["samples"]["by_source"],
            "parent": m.get("parent"),
        }
        for m in service.list_versions()
    ]
    if args.json:
        print_json(versions)
        return 0
    for v in versions:
        print(
            f"{'*' if v['active'] else ' '} {v['id']}  {v['classifier']:<14} macro-F1 {v['macro_f1']:.3f}  "
            f"threshold {v['threshold']}  samples {v['samples']}  parent {v['parent']}"
        )
    return 0


# -- coe mapping -----------------------------------------------------------------------------------------
def cmd_mapping(args, config) -> int:
    service, _ = _service(config, engine=not args.no_engine)
    result = service.set_active_params_budget(args.budget) if args.budget else service.current_mapping()
    points = service.frontier()
    out = {**result.to_dict(), "frontier": points}
    if args.json:
        print_json(out)
        return 0
    print(
        f"budget {_fmt_params(result.active_params_budget) if result.active_params_budget else 'none'}: expected score "
        f"{result.expected_score:.4f}, average active params {_fmt_params(result.avg_active_params)}"
        f"{'' if result.feasible else '  (INFEASIBLE: see notes)'}"
    )
    print(f"weights: {result.distribution_source}; scores: {result.score_table}")
    for cat, expert in result.assignment.items():
        print(f"  {cat:<12} -> {expert:<28} p={result.distribution.get(cat, 0):.3f}  {result.reasons[cat]}")
    for note in result.notes:
        print(f"  note: {note}")
    print("Pareto frontier (average active params -> expected score):")
    for p in points:
        print(f"  {_fmt_params(p['avg_active_params']):>8}  {p['expected_score']:.4f}")
    return 0


# -- coe eval-experts ------------------------------------------------------------------------------------
def cmd_eval_experts(args, config) -> int:
    from coe_core.engine import CoE
    from coe_core.routing.expert_eval import eval_experts, load_eval_sets

    eval_dir = config.resolve_path(args.eval_dir)
    sets = load_eval_sets(eval_dir, config.categories)
    if args.limit:
        for es in sets.values():
            es.items = es.items[: args.limit]
            es.sha256 = f"{es.sha256}:first{args.limit}"
    coe = CoE(config, routing=None, store=None)
    try:
        wanted = args.experts.split(",") if args.experts else list(config.experts)
        unknown = [e for e in wanted if e not in config.experts]
        if unknown:
            raise ValueError(f"unknown experts {unknown}; experts: {', '.join(config.experts)}")
        available = coe.available_experts()
        skipped = [e for e in wanted if e not in available]
        experts = [e for e in wanted if e in available]
        if not experts:
            raise ValueError(f"none of {wanted} is available; check `coe experts`")
        service, _ = _service(config)
        params = {**service.score_table().get("params", {}), **coe.expert_params()}
        cache = service.measured_scores_path()
        table = eval_experts(
            coe.reference_logprob,
            experts,
            sets,
            fallback=config.fallback_category,
            params=params,
            cache_path=cache,
            force=args.force,
        )
    finally:
        coe.close()
    out = {"path": str(cache), "skipped_unavailable": skipped, **table}
    if args.json:
        print_json(out)
        return 0
    print(f"score table written to {cache} ({table['method']['normalisation']})")
    cats = [*config.categories, config.fallback_category]
    print(f"{'expert':<28}" + "".join(f"{c[:8]:>9}" for c in cats))
    for e, row in table["scores"].items():
        print(f"{e:<28}" + "".join(f"{row.get(c, float('nan')):>9.3f}" for c in cats))
    if skipped:
        print(f"skipped (unavailable): {skipped}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the routing subcommands to the ``coe`` parser."""
    p = add_command(
        subparsers,
        "route",
        cmd_route,
        json_output=True,
        help="route one prompt: category, probabilities, expert and why",
    )
    p.add_argument("prompt")
    p.add_argument("--category", help="force this category")
    p.add_argument("--expert", help="force this expert")
    p.add_argument(
        "--no-engine",
        action="store_true",
        help="skip the engine (faster; all experts count as available, sizes from the score table)",
    )

    add_command(
        subparsers,
        "train-router",
        cmd_train_router,
        json_output=True,
        help="train a router version on the seed set and activate it",
    )

    p = add_command(
        subparsers,
        "retrain",
        cmd_retrain,
        json_output=True,
        help="retrain on seed + logged feedback; promote only if not worse",
    )
    p.add_argument("--force", action="store_true", help="promote the candidate even if it is worse")

    p = add_command(
        subparsers,
        "eval-router",
        cmd_eval_router,
        json_output=True,
        help="evaluate the active router on labelled JSONL files",
    )
    p.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help='JSONL files or globs: lines {"prompt" | "messages", "category"[, "lang", "style"]}',
    )

    p = add_command(
        subparsers,
        "calibrate-router",
        cmd_calibrate_router,
        json_output=True,
        help="pick the fallback threshold from held-out data and store it in the active router",
    )
    p.add_argument(
        "--target",
        type=float,
        default=None,
        help="routed precision to keep (default router.target_precision)",
    )

    p = add_command(
        subparsers,
        "router-versions",
        cmd_router_versions,
        json_output=True,
        help="list router versions; --activate ID switches",
    )
    p.add_argument("--activate", metavar="ID")

    p = add_command(
        subparsers,
        "mapping",
        cmd_mapping,
        json_output=True,
        help="category -> expert mapping under a budget, and the Pareto frontier",
    )
    p.add_argument("--budget", type=_budget_arg, help="average active parameters, e.g. 300M, 1.5B, auto")
    p.add_argument("--no-engine", action="store_true", help="skip the engine (all experts available)")

    p = add_command(
        subparsers,
        "eval-experts",
        cmd_eval_experts,
        json_output=True,
        help="measure the expert score table on assets/eval/<category>.jsonl",
    )
    p.add_argument("--experts", help="comma-separated subset (default: every expert of the profile)")
    p.add_argument("--eval-dir", default="assets/eval")
    p.add_argument("--limit", type=int, default=None, help="first N pairs per category (quick look)")
    p.add_argument("--force", action="store_true", help="re-measure cached values too")


def _budget_arg(value: str) -> str:
    if value.strip().lower() != "auto":
        try:
            parse_params(value, "budget")
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return value
