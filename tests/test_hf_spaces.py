"""What a Space changes: environment detection, network file systems under the data dir, the ZeroGPU entry point
(as far as it runs without ZeroGPU: the decorator is a no-op, the worker's code path on CPU, refusals as
clear messages)."""

from __future__ import annotations

import inspect

import gradio as gr
import pytest

from coe_core.engine import CoE
from coe_core.events import TextChunk
from coe_core.experts import zero_gpu
from coe_core.hf_spaces import (
    mount_of,
    on_space,
    on_zero_gpu,
    storage_warnings,
    zero_gpu_duration,
)

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
40 27 0:50 / /data rw,nosuid,nodev,relatime - fuse hf-mount rw,user_id=0,group_id=0,allow_other
41 27 0:51 / /mnt/my\\040share rw,relatime - nfs4 fileserver:/export rw,vers=4.2
"""


def test_space_and_zero_gpu_detection():
    assert on_space({"SYSTEM": "spaces", "SPACE_ID": "me/coe"}) and on_space({"SPACE_ID": "me/coe"})
    assert not on_space({})
    assert on_zero_gpu({"SPACES_ZERO_GPU": "true"}) and not on_zero_gpu({"SPACES_ZERO_GPU": "false"})
    assert not on_zero_gpu({})


def test_a_bucket_or_nfs_under_the_data_dir_is_named_at_start():
    assert mount_of("/data/coe/not-yet-created", MOUNTINFO).fstype == "fuse"  # nearest existing ancestor
    assert mount_of("/mnt/my share/x", MOUNTINFO).fstype == "nfs4"  # octal escapes in mount points
    assert mount_of("/home/user/.coe-data", MOUNTINFO).fstype == "ext4"
    (warning,) = storage_warnings("/data/coe", "sqlite:////data/coe/coe.sqlite3", MOUNTINFO)
    assert "network file system" in warning and "hf-mount" in warning and "COE_DATABASE_URL" in warning
    assert "COE_HUB_EXPORT_REPO" in warning
    (external,) = storage_warnings("/data/coe", "postgresql+psycopg://db/coe", MOUNTINFO)
    assert "external database" in external
    assert storage_warnings("/home/user/.coe-data", "sqlite:///x", MOUNTINFO) == []


def test_gpu_duration_grows_with_max_new_tokens_and_stays_bounded():
    durations = [zero_gpu_duration(n) for n in (1, 64, 256, 512, 1024, 100_000)]
    assert durations == sorted(durations)
    assert durations[0] >= 15 and durations[-1] == 120
    assert zero_gpu_duration(256) < 60  # below the ZeroGPU default: a visitor queues less and spends less quota


def test_off_zero_gpu_the_decorator_is_a_no_op():
    assert inspect.isgeneratorfunction(zero_gpu.generate_on_gpu)  # spaces.GPU returned the function itself
    assert not hasattr(zero_gpu.generate_on_gpu, "zerogpu")
    # the start-up hook spaces hangs on gr.Blocks.launch exists only on ZeroGPU: off it, a line, not a crash
    assert "no start-up hook" in zero_gpu.announce_gpu_functions()


@pytest.fixture
def coe(tiny_config):
    engine = CoE(tiny_config(), routing=None, store="auto", gpu=False, progress=False)
    yield engine
    engine.close()


def _answer(engine, **kwargs):
    events = list(engine.chat("write a python function", temperature=0, max_new_tokens=8, **kwargs))
    return "".join(e.text for e in events if isinstance(e, TextChunk)), events[-1].stats


def test_the_gpu_call_path_gives_the_same_answer(coe):
    plain, stats = _answer(coe)
    coe.zero_gpu = True  # route generation through the spaces.GPU entry point (runs here on CPU)
    via_call, zstats = _answer(coe)
    assert via_call == plain and zstats.status == "ok" and zstats.new_tokens == stats.new_tokens == 8


def test_on_zero_gpu_prepare_stages_every_expert_before_the_first_gpu_call(coe, monkeypatch):
    monkeypatch.setattr(zero_gpu, "_EXPERTS", {})
    coe.zero_gpu = True
    problems = coe.prepare()
    ready = {e for e, problem in problems.items() if problem is None}
    assert ready and set(zero_gpu._EXPERTS) == ready
    assert all(next(m.parameters()).device.type == "cpu" for m, _ in zero_gpu._EXPERTS.values())


def test_a_zero_gpu_refusal_ends_the_turn_with_a_clear_message(coe, monkeypatch):
    def refused(expert, input_ids, params):
        raise gr.Error(
            "You have exceeded your free ZeroGPU quota (23s requested vs. 4s left). Try again in 0:41:00.",
            title="ZeroGPU quota exceeded",
        )
        yield  # pragma: no cover

    monkeypatch.setattr(zero_gpu, "generate_on_gpu", refused)
    coe.zero_gpu = True
    _, stats = _answer(coe)
    assert stats.status == "error" and stats.error_type == "GPUQuotaError"
    assert stats.error.startswith("the GPU of this Space is not available to you right now")
    assert "Try again in 0:41:00" in stats.error and "Traceback" not in stats.error
    row = coe.store.get_interaction(stats.interaction_id)
    assert row["status"] == "error" and "quota" in row["error"]
