"""Router tab: the active version and its held-out metrics, version history, retrain, promote/rollback,
and the fallback threshold with its effect on the held-out set shown before it is applied."""

from __future__ import annotations

from typing import Any

import gradio as gr
import numpy as np

from app import plots
from app.context import AppContext
from app.errors import user_message

F1_COLUMNS = ["category", "precision", "recall", "F1", "held-out prompts"]
REVIEW_COLUMNS = ["feedback #", "turn #", "kind", "routed", "corrected to", "from", "prompt"]
#: pending feedback one review shows (and accepts or rejects) at a time
REVIEW_BATCH = 100
VERSION_COLUMNS = [
    "version",
    "trained (UTC)",
    "classifier",
    "macro-F1",
    "accuracy",
    "samples",
    "parent",
    "active",
    "comparison",
]


def f1_rows(metrics: dict) -> list[list[Any]]:
    return [
        [c, round(m["precision"], 3), round(m["recall"], 3), round(m["f1"], 3), m["n"]]
        for c, m in (metrics.get("per_category") or {}).items()
    ]


def version_rows(versions: list[dict]) -> list[list[Any]]:
    rows = []
    for v in sorted(versions, key=lambda m: m.get("trained_at") or "", reverse=True):
        metrics = v.get("metrics") or {}
        comparison = v.get("comparison") or {}
        verdict = ""
        if comparison:
            verdict = ("promoted: " if comparison.get("promoted") else "kept the active one: ") + str(
                comparison.get("why", "")
            )
        rows.append(
            [
                v["id"],
                (v.get("trained_at") or "")[:19].replace("T", " "),
                (v.get("classifier") or {}).get("name", ""),
                metrics.get("macro_f1"),
                metrics.get("accuracy"),
                (v.get("samples") or {}).get("total"),
                v.get("parent") or "",
                "✓" if v.get("active") else "",
                verdict,
            ]
        )
    return rows


def effect_text(now: dict, new: dict) -> str:
    """The threshold's effect on held-out prompts, now vs with the new value."""

    def line(name: str, key: str) -> str:
        return f"| {name} | {now[key]:.1%} | {new[key]:.1%} |"

    return "\n".join(
        [
            f"On **{now['n']}** development-set prompts (held-out prompts when there is no development set):",
            "",
            f"| | now (threshold {now['threshold']:.2f}) | with {new['threshold']:.2f} |",
            "|---|---|---|",
            line("routed precision", "precision"),
            line("coverage (routed, not fallback)", "coverage"),
            line("fallback rate", "fallback_rate"),
        ]
    )


SLICE_COLUMNS = ["slice", "accuracy", "prompts"]


def slice_rows(report: dict) -> list[list[Any]]:
    return [[name, round(row["accuracy"], 3), row["n"]] for name, row in (report.get("slices") or {}).items()]


def dev_summary(report: dict | None) -> str:
    if not report:
        return (
            "This version has no development-set report: set `router.dev_data` in spaces.yaml and "
            "retrain (or run `coe calibrate-router`)."
        )
    caught = report.get("wrong_caught_by_fallback")
    return "\n".join(
        [
            f"On **{report['n']}** development prompts at threshold **{report['threshold']:.2f}**:",
            f"- accuracy **{report['accuracy']:.1%}** (fallbacks count as `general`), "
            f"top choice right {report['accuracy_without_fallback']:.1%}",
            f"- fallback rate {report['fallback_rate']:.1%}; of the wrong top choices, "
            f"**{'-' if caught is None else f'{caught:.0%}'}** were caught by the fallback",
            f"- expected calibration error **{report['ece']:.3f}** (0 = confidence is exactly how often it is right)",
        ]
    )


def category_scopes(config: Any) -> str:
    """The labelling rule of the categories (``router.scopes``, one Markdown file), shown as written."""
    path = config.resolve_path(config.router.scopes) if config.router.scopes else None
    if path is None or not path.exists():
        return "No category scopes are written for this taxonomy (`router.scopes` in spaces.yaml)."
    return path.read_text(encoding="utf-8")


class RouterTab:
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.routing = ctx.routing

    def build(self) -> None:
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=300):
                self.active_md = gr.Markdown("Open this tab to load the router's metrics.")
                self.f1_table = gr.Dataframe(
                    headers=F1_COLUMNS, label="Per-category quality (held-out)", interactive=False
                )
            with gr.Column(scale=3, min_width=320):
                self.confusion_plot = gr.Plot(label="Confusion matrix", elem_classes=["coe-plot"], show_label=False)
        with gr.Accordion("Fallback threshold", open=True):
            gr.Markdown(
                "Prompts whose confidence is below the threshold go to the fallback category. "
                "Move the slider to see the effect on held-out prompts **before** applying it."
            )
            with gr.Row(equal_height=False):
                with gr.Column(scale=2, min_width=280):
                    self.threshold = gr.Slider(
                        0.0,
                        1.0,
                        step=0.01,
                        value=self.ctx.coe.config.router.threshold,
                        label="Fallback threshold (confidence, 0–1)",
                    )
                    self.effect_md = gr.Markdown()
                    self.apply_threshold = gr.Button("Apply threshold", variant="primary")
                with gr.Column(scale=3, min_width=300):
                    self.threshold_plot = gr.Plot(
                        label="Precision and coverage vs threshold", elem_classes=["coe-plot"], show_label=False
                    )
        with gr.Accordion("Development set: accuracy per slice and calibration", open=True):
            gr.Markdown(
                "Prompts written apart from the training data (`router.dev_data`): languages, casual "
                "typing, long pastes, multi-turn follow-ups, chit-chat. The fallback threshold is "
                "calibrated here; a fallback counts as right only for prompts labelled `general`."
            )
            with gr.Row(equal_height=False):
                with gr.Column(scale=2, min_width=280):
                    self.dev_md = gr.Markdown()
                    self.slice_table = gr.Dataframe(
                        headers=SLICE_COLUMNS, label="Accuracy per slice", interactive=False
                    )
                with gr.Column(scale=3, min_width=300):
                    self.reliability_plot = gr.Plot(label="Reliability", elem_classes=["coe-plot"], show_label=False)
        with gr.Accordion("What each category covers", open=False):
            gr.Markdown(category_scopes(self.ctx.coe.config))
        with gr.Accordion("Versions, retrain, promote / rollback", open=True):
            self.versions = gr.Dataframe(
                headers=VERSION_COLUMNS, label="Version history (newest first)", interactive=False, wrap=True
            )
            with gr.Row(equal_height=True):
                self.version_pick = gr.Dropdown([], label="Version", scale=3)
                self.activate = gr.Button("Activate this version", scale=1)
            with gr.Row(equal_height=True):
                self.force = gr.Checkbox(False, label="Promote even if held-out macro-F1 is worse", scale=2)
                self.retrain = gr.Button("Retrain from seed set + feedback", variant="primary", scale=1)
            self.action_md = gr.Markdown()
        with gr.Accordion("Review anonymous feedback", open=False):
            gr.Markdown(
                "Likes and corrections from visitors (not from an unlocked admin) are suggestions: they "
                "train the router only once an admin accepts them here."
            )
            self.review_md = gr.Markdown("Open this tab to count the feedback waiting for review.")
            self.review_table = gr.Dataframe(
                headers=REVIEW_COLUMNS, label="Waiting (oldest first)", interactive=False, wrap=True
            )
            with gr.Row(equal_height=True):
                self.review_load = gr.Button("Show the waiting feedback", scale=1)
                self.review_accept = gr.Button("Accept these as training labels", variant="primary", scale=1)
                self.review_reject = gr.Button("Reject these", variant="stop", scale=1)

    def wire(self, demo: gr.Blocks, tab: gr.Tab) -> None:
        private: dict[str, Any] = {"api_visibility": "private"}
        view = [
            self.active_md,
            self.f1_table,
            self.confusion_plot,
            self.versions,
            self.version_pick,
            self.threshold,
            self.effect_md,
            self.threshold_plot,
        ]
        tab.select(self.refresh, None, view, **private)
        tab.select(self.dev_view, None, [self.dev_md, self.slice_table, self.reliability_plot], **private)
        self.threshold.release(
            self.preview_threshold,
            self.threshold,
            [self.effect_md, self.threshold_plot],
            show_progress="hidden",
            **private,
        )
        admin = self.ctx.admin_state
        self.apply_threshold.click(self.set_threshold, [admin, self.threshold], self.action_md, **private).then(
            self.refresh, None, view, **private
        )
        self.activate.click(self.activate_version, [admin, self.version_pick], self.action_md, **private).then(
            self.refresh, None, view, **private
        )
        self.retrain.click(
            self.run_retrain,
            [admin, self.force],
            self.action_md,
            concurrency_limit=1,
            concurrency_id="retrain",
            **private,
        ).then(self.refresh, None, view, **private)
        review = [self.review_md, self.review_table]
        tab.select(self.review_count, None, self.review_md, **private)
        self.review_load.click(self.review_queue, admin, review, **private)
        self.review_accept.click(self.accept_shown, [admin, self.review_table], review, **private)
        self.review_reject.click(self.reject_shown, [admin, self.review_table], review, **private)

    # -- views -----------------------------------------------------------------------------------------
    def current_threshold(self, meta: dict) -> float:
        t = meta.get("threshold")
        return float(t) if t is not None else float(self.ctx.coe.config.router.threshold)

    def threshold_curve(self) -> list[dict]:
        return [self.routing.threshold_effect(float(t)) for t in np.linspace(0, 1, 51)]

    def refresh(self) -> tuple[Any, ...]:
        try:
            meta = self.routing.active_version()
            versions = self.routing.list_versions()
        except (ValueError, OSError, RuntimeError) as exc:
            gr.Warning(f"No router: {user_message(exc)}")
            msg = f"⚠️ No router: {user_message(exc)}"
            return (msg,) + (gr.update(),) * 7
        metrics = meta.get("metrics") or {}
        current = self.current_threshold(meta)
        classifier = meta.get("classifier") or {}
        samples = meta.get("samples") or {}
        md = "\n".join(
            [
                f"### Active router `{meta['id']}`",
                f"- trained **{(meta.get('trained_at') or '?')[:19].replace('T', ' ')} UTC** on "
                f"**{samples.get('total', '?')}** prompts ({samples.get('train', '?')} train, "
                f"{samples.get('heldout', '?')} held out; by source {samples.get('by_source', {})})",
                f"- classifier **{classifier.get('name', '?')}**: {classifier.get('why', '')}",
                f"- held-out **macro-F1 {metrics.get('macro_f1', 0):.3f}**, accuracy {metrics.get('accuracy', 0):.1%} "
                f"on {metrics.get('n', 0)} prompts",
                f"- fallback threshold **{current:.2f}** ({meta.get('threshold_set_by') or 'spaces.yaml'}), "
                f"temperature {meta.get('temperature', 1.0)}, features `{'+'.join(meta.get('features') or [])}`",
            ]
        )
        effect_md, curve_fig = self._threshold_view(current, current)
        choices = [
            (f"{v['id']}{' (active)' if v.get('active') else ''}", v["id"])
            for v in sorted(versions, key=lambda m: m.get("trained_at") or "", reverse=True)
        ]
        return (
            md,
            f1_rows(metrics),
            plots.confusion_figure(metrics.get("confusion") or {}),
            version_rows(versions),
            gr.update(choices=choices, value=meta["id"]),
            gr.update(value=current),
            effect_md,
            curve_fig,
        )

    def dev_view(self) -> tuple[Any, ...]:
        """The active version's development-set report (kept in its metadata when it was calibrated)."""
        try:
            meta = self.routing.active_version()
        except (ValueError, OSError, RuntimeError) as exc:
            return f"⚠️ No router: {user_message(exc)}", [], plots.empty_figure(user_message(exc))
        return (
            dev_summary(meta.get("dev_metrics")),
            slice_rows(meta.get("dev_metrics") or {}),
            plots.reliability_figure(
                (meta.get("dev_metrics") or {}).get("reliability") or [], (meta.get("dev_metrics") or {}).get("ece")
            ),
        )

    def _threshold_view(self, current: float, candidate: float) -> tuple[str, Any]:
        try:
            now, new = self.routing.threshold_effect(current), self.routing.threshold_effect(candidate)
            curve = self.threshold_curve()
        except (ValueError, OSError) as exc:
            return f"⚠️ {user_message(exc)}", plots.empty_figure(user_message(exc))
        return effect_text(now, new), plots.threshold_figure(curve, current=current, candidate=candidate)

    def preview_threshold(self, candidate: float) -> tuple[str, Any]:
        try:
            current = self.current_threshold(self.routing.active_version())
        except (ValueError, OSError) as exc:
            return f"⚠️ {user_message(exc)}", gr.update()
        return self._threshold_view(current, float(candidate))

    # -- review of anonymous feedback ----------------------------------------------------------------------
    def review_count(self) -> str:
        """How many wait (an aggregate: everyone may see it)."""
        store = self.ctx.coe.store
        if store is None:
            return "No interaction store: no feedback to review."
        try:
            n = store.pending_count()
        except (ValueError, RuntimeError) as exc:
            return f"⚠️ {user_message(exc)}"
        return (
            f"**{n}** like(s) and correction(s) from visitors wait for review."
            if n
            else "No feedback waits for review."
        )

    def review_queue(self, unlocked: bool) -> tuple[str, Any]:
        """The waiting feedback with its prompts: other people's text, so admin only (checked here)."""
        self.ctx.gate.require_private(unlocked, "Reviewing feedback")
        store = self.ctx.coe.store
        if store is None:
            return self.review_count(), []
        pending = store.pending_feedback(REVIEW_BATCH)
        rows = [
            [
                p["id"],
                p["interaction_id"],
                p["kind"],
                p["category"],
                p["corrected_category"] or "",
                p["author"] or "",
                " ".join((p["prompt"] or "").split())[:160],
            ]
            for p in pending
        ]
        return self.review_count(), rows

    def accept_shown(self, unlocked: bool, shown: Any) -> tuple[str, Any]:
        return self.review(unlocked, shown, True)

    def reject_shown(self, unlocked: bool, shown: Any) -> tuple[str, Any]:
        return self.review(unlocked, shown, False)

    def review(self, unlocked: bool, shown: Any, accept: bool) -> tuple[str, Any]:
        """Accept or reject the feedback the admin was shown (those still waiting; never more)."""
        self.ctx.gate.require_private(unlocked, "Reviewing feedback")
        store = self.ctx.coe.store
        if store is None:
            return self.review_count(), []
        rows = shown.values.tolist() if hasattr(shown, "values") else (shown or [])
        ids = []
        for row in rows:
            try:
                ids.append(int(row[0]))
            except (TypeError, ValueError, IndexError, OverflowError):
                continue
        n = store.review_feedback(ids, accept)
        gr.Info(f"{n} feedback {'accepted: they count at the next retrain' if accept else 'rejected'}.")
        return self.review_queue(unlocked)

    # -- actions (admin) -------------------------------------------------------------------------------
    def set_threshold(self, unlocked: bool, value: float) -> str:
        self.ctx.gate.require(unlocked, "Changing the threshold")
        try:
            meta = self.routing.set_threshold(float(value), source="app")
        except (ValueError, OSError) as exc:
            raise gr.Error(user_message(exc)) from None
        gr.Info(f"Fallback threshold is now {float(value):.2f} for router {meta.get('id', '')}.")
        return f"✓ Fallback threshold set to **{float(value):.2f}**; it applies to the next prompt."

    def activate_version(self, unlocked: bool, version_id: str | None) -> str:
        self.ctx.gate.require(unlocked, "Activating a router version")
        if not version_id:
            raise gr.Error("Pick a version first.")
        try:
            self.routing.activate(version_id)
        except (ValueError, OSError, KeyError) as exc:
            raise gr.Error(f"Cannot activate {version_id}: {user_message(exc)}") from None
        gr.Info(f"Router {version_id} is active now.")
        return f"✓ Router **{version_id}** is active; the next prompt uses it."

    def run_retrain(self, unlocked: bool, force: bool, progress: gr.Progress = gr.Progress()) -> str:  # noqa: B008 (gradio injects it)
        """What `coe retrain` does: seed set + labelled feedback from the log -> candidate -> promote if not worse."""
        self.ctx.gate.require(unlocked, "Retraining the router")
        progress(
            0.1,
            desc="training a candidate on the seed set + labelled feedback from the log "
            "(embedding, comparing classifiers)",
        )
        try:
            result = self.routing.retrain_from_log(force=bool(force))
        except (ValueError, OSError, RuntimeError) as exc:
            raise gr.Error(f"Retraining failed: {user_message(exc)}") from None
        cand = result["candidate_metrics"]
        act = result.get("active_metrics")
        verdict = "**promoted**" if result["promoted"] else "**not promoted**"
        lines = [
            f"Candidate `{result['candidate']}` {verdict}: {result['why']}",
            f"- {result['feedback_prompts']} labelled prompts from feedback; "
            f"samples by source {result['samples']['by_source']}",
            f"- held-out ({result['heldout_n']} prompts): candidate macro-F1 **{cand['macro_f1']:.3f}**"
            + (f" vs active {act['macro_f1']:.3f}" if act else ""),
        ]
        gr.Info(f"Candidate {result['candidate']} {'promoted' if result['promoted'] else 'not promoted'}.")
        return "\n".join(lines)
