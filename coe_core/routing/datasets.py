"""The router's labelled data as spaces.yaml names it: the training files (``router.seed_data``) and the
development set written apart from them (``router.dev_data``), read as routed text."""

from __future__ import annotations

from typing import Any

from coe_core.config import CoEConfig
from coe_core.labelled import LabelledPrompt
from coe_core.routing.training import LabelledFile, expand_paths, load_labelled_files


class Datasets:
    def __init__(self, config: CoEConfig) -> None:
        self.config = config
        self._seed: LabelledFile | None = None

    def _load(self, patterns: list[str], source: str) -> LabelledFile:
        r = self.config.router
        return load_labelled_files(
            expand_paths(patterns, self.config.resolve_path),
            self.config.categories,
            source=source,
            keep_labels=[self.config.fallback_category],
            context_turns=r.context_turns,
            context_chars=r.context_chars,
        )

    def _seed_file(self) -> LabelledFile:
        if self._seed is None:  # read once: the prompts trained on and their digest must describe one read
            self._seed = self._load(self.config.router.seed_data, "seed")
        return self._seed

    def seed(self) -> list[LabelledPrompt]:
        """The training prompts."""
        return list(self._seed_file().examples)

    def seed_file_info(self) -> dict[str, Any]:
        data = self._seed_file()
        # labels of the files that are not categories of spaces.yaml (a taxonomy typo shows up here)
        return {
            "path": list(self.config.router.seed_data),
            "sha256": data.sha256,
            "outside_taxonomy": data.outside_taxonomy,
        }

    def dev(self) -> list[LabelledPrompt]:
        """The development set, or nothing when none is configured."""
        if not self.config.router.dev_data:
            return []
        return self._load(self.config.router.dev_data, "dev").examples
