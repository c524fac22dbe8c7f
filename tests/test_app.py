"""The Gradio playground: figure builders and helpers (pure, fast), and the public API of a launched app
(gradio_client against the real packaged experts and router, in an isolated data dir)."""

from __future__ import annotations

import shutil
import socket
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import gradio as gr
import numpy as np
import pytest

from app import plots
from app.admin import AdminGate
from app.chat_messages import connection_message, engine_messages, routing_message, swap_message, text_of
from app.explorer_tab import parse_prompts
from app.mapping_tab import point_for_budget, shown_path, single_expert_points
from app.theme import FALLBACK_COLOR, TIER_COLORS, category_colors
from coe_core.events import RemoteConnect, RouteDecision, SwapEvent
from coe_core.tiers.snapshot import ExpertResidency, TierSnapshot, TierUsage

CATS = ["coding", "math", "writing"]
COLORS = category_colors(CATS, "general")


def annotations_text(fig) -> str:
    return " ".join(a.text or "" for a in fig.layout.annotations)


# -- theme -----------------------------------------------------------------------------------------------
def test_category_colours_are_stable_distinct_and_fallback_is_grey():
    again = category_colors(CATS, "general")
    assert again == COLORS
    assert len({COLORS[c] for c in CATS}) == len(CATS)
    assert COLORS["general"] == FALLBACK_COLOR


# -- chat tab figures ------------------------------------------------------------------------------------
def test_probability_plot_draws_bars_in_category_colours_and_the_threshold_line():
    fig = plots.probabilities_figure(
        {"coding": 0.7, "math": 0.2, "writing": 0.1}, COLORS, threshold=0.35, chosen="coding"
    )
    bar = fig.data[0]
    assert list(bar.y) == CATS and list(bar.x) == [0.7, 0.2, 0.1]
    assert list(bar.marker.color) == [COLORS[c] for c in CATS]
    lines = [s for s in fig.layout.shapes if s.type == "line"]
    assert len(lines) == 1 and lines[0].x0 == pytest.approx(0.35)
    assert "fallback threshold 0.35" in annotations_text(fig)
    assert fig.layout.height and fig.layout.height > 100


def test_probability_plot_without_probabilities_says_why():
    fig = plots.probabilities_figure({}, COLORS)
    assert not fig.data and "send a prompt" in annotations_text(fig)


SNAPSHOT = TierSnapshot(
    exec_tier="cpu",
    tiers={
        "gpu": TierUsage("gpu", False, 0, 0, "absent: no CUDA device"),
        "cpu": TierUsage("cpu", True, 2_000_000_000, 1_500_000_000, "spaces.yaml"),
        "disk": TierUsage("disk", True, 40_000_000_000, 2_000_000_000, "spaces.yaml"),
    },
    experts={
        "small": ExpertResidency(
            "cpu",
            {"gpu": 0, "cpu": 500_000_000, "disk": 500_000_000},
            500_000_000,
            0,
            "float32",
            "transformers",
            pinned=1,
        ),
        "big": ExpertResidency(
            "cpu",
            {"gpu": 0, "cpu": 1_000_000_000, "disk": 1_500_000_000},
            1_000_000_000,
            0,
            "float32",
            "transformers",
            pinned=0,
        ),
    },
)


def test_residency_plot_stacks_experts_per_tier_marks_absent_tiers_and_the_generating_expert():
    fig = plots.residency_figure(SNAPSHOT)
    titles = annotations_text(fig)
    assert "gpu</b> — absent on this machine (no CUDA device)" in titles
    assert "1.50 GB used of 2.00 GB" in titles
    cpu_bars = [b for b in fig.data if b.y[0] == "cpu"]
    assert sorted(b.name for b in cpu_bars) == ["big", "small"]
    assert sum(b.x[0] for b in cpu_bars) == pytest.approx(1.5)  # GB
    assert all(b.marker.color == TIER_COLORS["cpu"] for b in cpu_bars)
    small = next(b for b in cpu_bars if b.name == "small")
    assert "▶" in small.text[0]
    assert not [b for b in fig.data if b.y[0] == "gpu"]
    # the cpu budget (2 GB) is in view of 1.5 GB used: drawn as a line; the 40 GB disk budget is not
    budget_lines = [s for s in fig.layout.shapes if s.type == "line"]
    assert [round(s.x0, 2) for s in budget_lines] == [2.0]


def test_timeline_shows_each_phase_and_the_swap_steps_with_tokens_per_second():
    swap = SwapEvent(
        "small", "disk", "cpu", 500_000_000, 0.5, phases={"read": 0.4, "bind": 0.1}, started_at=0.1
    ).to_dict()
    timeline = [("route", 0.0, 0.05), ("swap", 0.1, 0.6), ("prefill", 0.6, 0.9), ("generate", 0.9, 2.9)]
    fig = plots.timeline_figure(timeline, [swap], tokens_per_s=12.5, new_tokens=25)
    bar = fig.data[0]
    labels = list(bar.y)
    assert labels[0] == "route" and labels[-1] == "generate"
    assert any("disk→cpu: read" in label for label in labels)
    read = labels.index(next(label for label in labels if label.endswith("read")))
    assert bar.base[read] == pytest.approx(0.1) and bar.x[read] == pytest.approx(0.4)
    assert "12.5 tokens/s" in fig.layout.title.text and "25 tokens" in fig.layout.title.text
    assert "(s)" in fig.layout.xaxis.title.text


def test_a_remote_experts_connection_shows_as_its_own_step_not_as_a_swap():
    connection = RemoteConnect(
        "edge", connect_s=0.05, headers_s=0.2, first_byte_s=0.3, started_at=0.1, base_url="http://gpu-box:8000/v1"
    )
    timeline = [("route", 0.0, 0.05), ("connect", 0.1, 0.4), ("prefill", 0.4, 0.5), ("generate", 0.5, 1.0)]
    fig = plots.timeline_figure(timeline, [], connection=connection.to_dict())
    labels, bar = list(fig.data[0].y), fig.data[0]
    steps = [label for label in labels if label.startswith("  edge: ")]
    assert steps == ["  edge: connect", "  edge: headers", "  edge: first_byte"]
    first_byte = labels.index("  edge: first_byte")  # the stretches follow each other and end at the first byte
    assert bar.base[first_byte] + bar.x[first_byte] == pytest.approx(0.1 + 0.3)
    msg = connection_message(connection, "route-1")
    assert msg["metadata"]["parent_id"] == "route-1" and "first byte after 0.30 s" in msg["metadata"]["title"]
    assert "⇄" not in msg["metadata"]["title"] and "gpu-box" in msg["content"]
    boxes = plots.swap_times_figure({"disk->cpu": [1.0]}, {"edge": [0.3, 0.4]})
    assert [t.name for t in boxes.data] == ["disk → cpu", "edge: first byte"]


# -- explorer, router, mapping, analytics figures --------------------------------------------------------
def test_routing_map_colours_seeds_by_category_and_places_new_prompts_as_stars():
    seed_xy = np.array([[0, 0], [1, 1], [2, 2]], dtype=float)
    fig = plots.routing_map_figure(
        seed_xy,
        ["coding", "math", "coding"],
        COLORS,
        new_xy=np.array([[0.5, 0.5]]),
        new_categories=["math"],
        new_labels=["what is 2+2"],
    )
    seeds = {t.name: t for t in fig.data if t.name in CATS}
    assert seeds["coding"].marker.color == COLORS["coding"] and len(seeds["coding"].x) == 2
    stars = next(t for t in fig.data if t.name == "your prompts")
    assert stars.marker.symbol == "star" and list(stars.marker.color) == [COLORS["math"]]


def test_confusion_heatmap_colours_by_row_share_and_prints_counts():
    fig = plots.confusion_figure({"labels": ["a", "b"], "matrix": [[3, 1], [0, 4]]})
    heat = fig.data[0]
    assert np.allclose(heat.z, [[0.75, 0.25], [0.0, 1.0]])
    assert np.array_equal(np.asarray(heat.text), [[3, 1], [0, 4]])


def test_reliability_diagram_plots_accuracy_per_confidence_bin_against_the_diagonal():
    table = [
        {"bin": "0.0-0.1", "n": 0, "confidence": None, "accuracy": None},
        {"bin": "0.5-0.6", "n": 20, "confidence": 0.55, "accuracy": 0.6},
        {"bin": "0.9-1.0", "n": 300, "confidence": 0.97, "accuracy": 0.98},
    ]
    fig = plots.reliability_figure(table, 0.021)
    bars, diagonal = fig.data
    assert list(bars.x) == [0.55, 0.97] and list(bars.y) == [0.6, 0.98] and list(bars.text) == ["20", "300"]
    assert list(diagonal.x) == [0, 1] and "ECE 0.021" in fig.layout.title.text
    assert "no development-set" in plots.reliability_figure([], None).layout.annotations[0].text


def test_router_tab_reports_the_development_set_per_slice():
    from app.router_tab import dev_summary, slice_rows

    report = {
        "n": 810,
        "threshold": 0.66,
        "accuracy": 0.88,
        "accuracy_without_fallback": 0.92,
        "fallback_rate": 0.09,
        "wrong_caught_by_fallback": 0.53,
        "ece": 0.02,
        "slices": {"lang=zh": {"n": 36, "accuracy": 0.94}, "length=long": {"n": 168, "accuracy": 0.95}},
    }
    assert slice_rows(report) == [["lang=zh", 0.94, 36], ["length=long", 0.95, 168]]
    text = dev_summary(report)
    assert "810" in text and "88.0%" in text and "53%" in text and "0.020" in text
    assert "router.dev_data" in dev_summary(None)


def test_frontier_plot_marks_the_current_point_and_each_single_expert():
    frontier = [
        {"avg_active_params": 300e6, "expected_score": 0.7, "assignment": {}},
        {"avg_active_params": 150e6, "expected_score": 0.6, "assignment": {}},
    ]
    singles = [{"expert": "a", "avg_active_params": 150e6, "expected_score": 0.6}]
    fig = plots.frontier_figure(
        frontier, current={"avg_active_params": 300e6, "expected_score": 0.7}, singles=singles, budget=200e6
    )
    names = [t.name for t in fig.data]
    assert names[0] == "Pareto frontier" and list(fig.data[0].x) == [150, 300]  # millions, cheapest first
    assert "only a" in names and "current mapping" in names
    assert "budget 200M" in annotations_text(fig)


def test_analytics_figures_say_when_nothing_is_logged_and_colour_swaps_by_destination_tier():
    for fig in (
        plots.turns_over_time_figure([], COLORS),
        plots.expert_usage_figure({}),
        plots.ttft_figure([]),
        plots.swap_times_figure({}),
    ):
        assert not fig.data and "logged yet" in annotations_text(fig)
    fig = plots.swap_times_figure({"disk->cpu": [1.0, 1.2], "cpu->gpu": [0.1]})
    colours = {t.name: t.marker.color for t in fig.data}
    assert colours == {"disk → cpu": TIER_COLORS["cpu"], "cpu → gpu": TIER_COLORS["gpu"]}
    turns = plots.turns_over_time_figure(
        [
            {"day": "2026-01-01", "category": "math", "turns": 3},
            {"day": "2026-01-02", "category": "coding", "turns": 1},
        ],
        COLORS,
    )
    assert {t.name: t.marker.color for t in turns.data} == {"coding": COLORS["coding"], "math": COLORS["math"]}
    rates = plots.rates_figure(0.25, {"like": 0.5, "dislike": 0.0, "wrong_category": 0.1})
    assert list(rates.data[0].text) == ["25.0%", "50.0%", "0.0%", "10.0%"]


# -- helpers ---------------------------------------------------------------------------------------------
def test_engine_messages_keep_the_conversation_and_drop_routing_thoughts():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "coding (0.9) -> x", "metadata": {"title": "🧭 coding"}},
        {"role": "assistant", "content": [{"type": "text", "text": "hello!"}], "metadata": None},
    ]
    assert engine_messages(history, "and now?") == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello!"},
        {"role": "user", "content": "and now?"},
    ]
    assert text_of([{"text": "a"}, "b"]) == "ab"


def test_routing_message_says_category_probability_expert_and_why_with_swaps_as_children():
    d = RouteDecision(
        "general",
        "small",
        "fallback",
        probabilities={"coding": 0.3},
        confidence=0.3,
        fallback=True,
        threshold=0.35,
        explanation="unsure -> general -> small",
    )
    msg = routing_message(d, "route-1")
    assert msg["metadata"]["title"].startswith("🧭 general → small")
    assert "fallback" in msg["metadata"]["title"] and msg["metadata"]["status"] == "pending"
    assert "below the fallback threshold 0.35" in msg["content"]
    child = swap_message(SwapEvent("small", "disk", "cpu", 2_000_000_000, 2.0), "route-1")
    assert child["metadata"]["parent_id"] == "route-1"
    assert "disk → cpu, 2.00 GB in 2.00 s (1.00 GB/s)" in child["metadata"]["title"]


def test_the_mapping_tab_shows_the_score_table_path_without_the_machines_folders(tmp_path):
    project, data = tmp_path / "project", tmp_path / "project" / ".coe-data"
    roots = {"project": project, "data_dir": data}
    assert shown_path(project / "assets/scores/offline.json", **roots) == "assets/scores/offline.json"
    assert shown_path(data / "scores/offline.json", **roots) == "<data dir>/scores/offline.json"
    assert shown_path("/srv/elsewhere/cluster.json", **roots) == "…/cluster.json"
    assert shown_path(None, **roots) == "none"


def test_budget_picks_the_best_affordable_frontier_point_and_single_experts_are_weighted_by_traffic():
    frontier = [{"avg_active_params": 300, "expected_score": 0.7}, {"avg_active_params": 100, "expected_score": 0.5}]
    assert point_for_budget(frontier, 200)["expected_score"] == 0.5
    assert point_for_budget(frontier, None)["expected_score"] == 0.7
    assert point_for_budget(frontier, 50) is None
    points = single_expert_points({"a": {"coding": 1.0, "math": 0.0}}, {"a": 100}, {"coding": 0.25, "math": 0.75})
    assert points == [{"expert": "a", "avg_active_params": 100.0, "expected_score": 0.25}]


def test_parse_prompts_takes_one_prompt_per_non_empty_line():
    assert parse_prompts("  a \n\n b\n") == ["a", "b"]
    assert parse_prompts("") == []


def test_admin_gate_open_mode_and_token():
    assert AdminGate("").open_mode and AdminGate("").check(None)
    gate = AdminGate("s3cret")
    assert not gate.open_mode and gate.check("s3cret") and not gate.check("nope") and not gate.check(None)
    gate.require(True, "x")
    with pytest.raises(gr.Error, match="needs the admin token"):
        gate.require(False, "Retraining")


# -- a launched app (gradio_client) ----------------------------------------------------------------------
@dataclass
class Server:
    url: str
    coe: object
    demo: object


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_lock = threading.Lock()


@cache
def _launch(data_dir: Path, router_dir: Path) -> Server:
    """One app per test session (the API and browser tests share it); closed when the process exits."""
    import atexit

    from app.ui import build_app, launch_kwargs
    from coe_core.engine import CoE
    from tests.conftest import packaged_config

    config = packaged_config(data_dir)
    if not (config.data_path / "router").exists():
        shutil.copytree(router_dir, config.data_path / "router")
    coe = CoE(config, progress=False)
    problems = coe.prepare()
    demo = build_app(coe, problems=problems, gate=AdminGate(""))
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs())

    def close() -> None:
        demo.close()
        coe.close()

    atexit.register(close)
    return Server(f"http://127.0.0.1:{port}/", coe, demo)


@pytest.fixture(scope="session")
def app_server(tmp_path_factory, seed_router_dir) -> Server:
    with _lock:
        return _launch(tmp_path_factory.getbasetemp() / "app-data", seed_router_dir)


@pytest.fixture(scope="session")
def client(app_server):
    from gradio_client import Client

    return Client(app_server.url, verbose=False)


@pytest.mark.slow
def test_api_exposes_route_chat_and_feedback_only(client):
    named = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert named == {"/route", "/chat", "/feedback"}


@pytest.mark.slow
def test_route_endpoint_returns_the_decision_without_generating(client, app_server):
    before = app_server.coe.store.stats()["turns"]
    d = client.predict("Write a Python function that reverses a linked list", api_name="/route")
    assert d["category"] == "coding" and d["expert"] in app_server.coe.config.experts
    assert sum(d["probabilities"].values()) == pytest.approx(1.0, abs=0.01)
    assert d["reason"] == "mapped" and "coding" in d["explanation"]
    forced = client.predict("hello", None, None, "gemma3-270m", api_name="/route")
    assert forced["expert"] == "gemma3-270m" and forced["reason"] == "override-expert"
    assert app_server.coe.store.stats()["turns"] == before  # routing only: nothing generated or logged


@pytest.mark.slow
def test_route_endpoint_rejects_bad_input_with_a_clear_message(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="empty prompt"):
        client.predict("   ", api_name="/route")
    with pytest.raises(AppError, match="unknown expert 'nope'"):
        client.predict("hi", None, None, "nope", api_name="/route")


@pytest.mark.slow
def test_chat_endpoint_streams_an_answer_with_its_route_and_feedback_reaches_the_store(client, app_server):
    from gradio_client.exceptions import AppError

    job = client.submit("What is the capital of France?", None, None, "smollm2-135m", 12, 0.0, api_name="/chat")
    updates = list(job)
    final = job.result()
    assert len(updates) > 2  # streamed: the route first, then the text grows
    assert updates[0]["route"]["expert"] == "smollm2-135m" and not updates[0]["done"]
    texts = [u["text"] for u in updates]
    assert texts == sorted(texts, key=len) and final["text"].strip()
    assert final["done"] and final["status"] == "ok"
    assert final["route"]["reason"] == "override-expert" and final["stats"]["new_tokens"] > 0
    turn_id = final["interaction_id"]
    logged = app_server.coe.store.get_interaction(turn_id)
    assert logged["client"] == "api" and logged["response"] == final["text"]

    client.predict(turn_id, "wrong_category", "humanities", api_name="/feedback")
    latest = app_server.coe.store.latest_feedback(turn_id)
    assert latest["kind"] == "wrong_category" and latest["corrected_category"] == "humanities"
    client.predict(turn_id, "retracted", None, api_name="/feedback")
    assert app_server.coe.store.latest_feedback(turn_id) is None
    with pytest.raises(AppError, match="unknown feedback kind"):
        client.predict(turn_id, "meh", None, api_name="/feedback")
