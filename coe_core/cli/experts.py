"""``coe experts``: the experts of the profile, their tiers and state."""

from __future__ import annotations

import argparse

from coe_core.cli.common import add_command, gb, print_json
from coe_core.config import CoEConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(subparsers, "experts", cmd_experts, json_output=True, help="list experts, their tiers and state")
    p.add_argument("--prepare", action="store_true", help="materialise and verify every expert first")


def cmd_experts(args: argparse.Namespace, config: CoEConfig) -> int:
    from coe_core.engine import CoE

    coe = CoE(config, routing=None, store=None)
    if args.prepare:
        coe.catalog.prepare()  # local experts materialised, remote endpoints checked
    info = coe.experts_info()
    if args.json:
        print_json(info)
        return 0
    print(f"profile {info['profile']}, execution tier {info['exec_tier']}")
    for name, t in info["tiers"].items():
        extra = f"budget {gb(t['budget'])} used {gb(t['used'])} free {gb(t['free'])}" if t["exists"] else "absent"
        print(f"  tier {name:<5} {extra}")
    for e in info["experts"]:
        params = f"{e['params'] / 1e6:.0f}M" if e["params"] else "?"
        runtime = e.get("runtime") or "remote"
        print(f"  {e['id']:<28} {e['state']:<12} {runtime:<12} params {params:<6} {gb(e['bytes']):<9} {e['source']}")
        if e["reason"]:
            print(f"      {e['reason']}")
        if e.get("runtime_note"):
            print(f"      {e['runtime_note']}")
        if e.get("remote"):
            health = e["remote"]["health"]
            status = {True: "answering", False: f"DOWN: {health['error']}", None: "not checked yet"}[health["ok"]]
            print(f"      remote model {e['remote']['model']} at {e['remote']['base_url']}: {status}")
    return 0
