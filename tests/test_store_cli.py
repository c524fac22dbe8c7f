"""`coe export`, `coe stats`, `coe feedback`: what a user types and sees."""

from __future__ import annotations

import argparse
import csv
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from coe_core.cli.store import register
from coe_core.config import PACKAGE_ROOT, load_config
from coe_core.store import Store, TurnRecord


@pytest.fixture
def config(tmp_path: Path):
    return load_config(PACKAGE_ROOT / "spaces.yaml", env=False, data_dir=str(tmp_path / "data"))


def run(config, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="coe")
    register(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    return args.func(args, config)


@pytest.fixture
def logged(config) -> list[int]:
    with Store.from_config(config) as store:
        old = store.log_turn(
            TurnRecord(
                expert="smollm2-135m",
                prompt="old",
                category="math",
                started_at=datetime.now(UTC) - timedelta(days=30),
                ttft_s=0.5,
            )
        )
        new = store.log_turn(TurnRecord(expert="smollm2-135m", prompt="sort a list", category="coding", ttft_s=0.1))
    return [old, new]


def test_feedback_is_recorded_and_bad_feedback_is_one_clear_line(config, logged, capsys):
    assert run(config, "feedback", str(logged[1]), "wrong_category", "--category", "math") == 0
    assert "recorded on interaction" in capsys.readouterr().out
    with Store.from_config(config) as store:
        assert store.latest_feedback(logged[1])["corrected_category"] == "math"

    assert run(config, "feedback", str(logged[1]), "love") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "like, dislike, wrong_category, retracted" in err
    assert run(config, "feedback", "999", "like") == 2
    assert "no interaction 999" in capsys.readouterr().err
    assert run(config, "feedback", str(logged[1]), "wrong_category", "--category", "cooking") == 2
    assert "coding, math" in capsys.readouterr().err


def test_export_writes_the_file_and_honours_since(config, logged, tmp_path: Path, capsys):
    out = tmp_path / "export.csv"
    since = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    assert run(config, "export", "--format", "csv", "--since", since, "--out", str(out)) == 0
    assert "exported 1 turn(s)" in capsys.readouterr().err
    rows = list(csv.DictReader(out.open(newline="")))
    assert [r["prompt"] for r in rows] == ["sort a list"]

    assert run(config, "export") == 0  # jsonl on stdout, everything
    assert [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()] == logged

    assert run(config, "export", "--since", "last tuesday") == 2
    assert "is not a date" in capsys.readouterr().err


def test_stats_prints_a_summary_or_json(config, logged, capsys):
    assert run(config, "stats") == 0
    text = capsys.readouterr().out
    assert "turns:        2" in text and "coding 1" in text and "p50 0.300 s" in text
    assert run(config, "stats", "--json") == 0
    assert json.loads(capsys.readouterr().out)["by_category"] == {"math": 1, "coding": 1}


def test_review_lists_and_accepts_visitors_feedback(config, logged, capsys):
    with Store.from_config(config) as store:
        fb = store.add_feedback(
            logged[1],
            "wrong_category",
            "math",
            categories=list(config.all_categories),
            review="pending",
            author="gradio:abc",
        )
    assert run(config, "review") == 0
    out = capsys.readouterr()
    assert f"{fb}\tturn {logged[1]}\tcoding\twrong_category -> math\tsort a list" in out.out
    assert "1 waiting" in out.err
    assert run(config, "review", "--accept", str(fb)) == 0 and "1 feedback accepted" in capsys.readouterr().out
    with Store.from_config(config) as store:
        assert store.pending_count() == 0
