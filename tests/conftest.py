"""Shared fixtures: tiny random-weight experts for engine logic, and the real packaged experts.

Tiny experts are built from transformers configs with a tokenizer trained on the spot, so the engine tests run
in seconds and need no download. The real experts are materialised once into ``<repo>/.coe-data/experts`` and
shared by every test through a symlink in each test's own data dir (router artifacts and SQLite stay per test).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _var in (
    "COE_PROFILE",
    "COE_DATA_DIR",
    "COE_CPU_BUDGET",
    "COE_GPU_BUDGET",
    "COE_DISK_BUDGET",
    "COE_DATABASE_URL",
    "COE_MAPPING_BUDGET",
    "COE_CONFIG",
    "COE_ADMIN_TOKEN",
):
    os.environ.pop(_var, None)

REPO = Path(__file__).resolve().parent.parent
SHARED_EXPERTS = Path(os.environ.get("COE_TEST_EXPERTS_DIR", REPO / ".coe-data" / "experts"))

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "write a python function that adds two numbers",
    "what is the capital of france paris is the capital",
    "solve for x: 2x + 3 = 7 so x equals 2",
    "once upon a time there was a little robot who liked to read",
] * 20


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


def make_tiny_expert(
    folder: Path,
    *,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    chat: bool = True,
    tie: bool = True,
    context: int = 256,
) -> Path:
    """Save a random-weight Llama model + tokenizer as a transformers folder (a ``dir:`` source)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    if not chat:
        tokenizer.chat_template = None
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory) -> dict[str, Path]:
    """Three tiny experts of different sizes (small < medium < large) and a plain-format one."""
    base = tmp_path_factory.mktemp("tiny-sources")
    return {
        "small": make_tiny_expert(base / "small", hidden=32, seed=1),
        "medium": make_tiny_expert(base / "medium", hidden=48, seed=2, tie=False),
        "large": make_tiny_expert(base / "large", hidden=64, layers=3, seed=3),
        "plain": make_tiny_expert(base / "plain", hidden=32, seed=4, chat=False),
    }


def tiny_config_dict(sources: dict[str, Path], data_dir: Path, **tiers) -> dict:
    experts = {name: {"source": f"dir:{path}", "generalist": name == "small"} for name, path in sources.items()}
    experts["plain"].update(prompt_format="plain", stop=["\nQuestion:"])
    return {
        "data_dir": str(data_dir),
        "tiers": {
            "cpu": {"budget": tiers.get("cpu", "auto")},
            "disk": {"budget": tiers.get("disk", "auto")},
            "read_threads": 4,
            "warmup": True,
        },
        "store": {"url": f"sqlite:///{data_dir / 'test.sqlite3'}"},
        "profiles": {"offline": {"default_expert": "small", "experts": experts}},
    }


@pytest.fixture
def tiny_config(tiny_sources, tmp_path):
    """Build a config of tiny experts; keyword arguments set tier budgets (bytes)."""
    from coe_core.config import config_from_dict

    def build(**tiers):
        return config_from_dict(tiny_config_dict(tiny_sources, tmp_path / "data", **tiers), env=False)

    return build


def packaged_config(data_dir: Path):
    """The packaged default (spaces.yaml) in ``data_dir``, whose disk tier is shared across tests."""
    from coe_core.config import load_config

    data_dir.mkdir(parents=True, exist_ok=True)
    SHARED_EXPERTS.mkdir(parents=True, exist_ok=True)
    if not (data_dir / "experts").exists():
        (data_dir / "experts").symlink_to(SHARED_EXPERTS, target_is_directory=True)
    return load_config(REPO / "spaces.yaml", env=False, data_dir=str(data_dir))


@pytest.fixture
def real_config(tmp_path):
    """The packaged default in a fresh test data dir (experts shared, no router yet, own SQLite)."""
    return packaged_config(tmp_path / "data")


@pytest.fixture(scope="session")
def seed_router_dir(tmp_path_factory) -> Path:
    """A router trained once per test session on the shipped seed set (training costs ~20 s of CPU)."""
    from coe_core.routing.service import RoutingService

    data_dir = tmp_path_factory.mktemp("seed-router")
    RoutingService(packaged_config(data_dir), progress=lambda msg: None).warm_up()
    return data_dir / "router"


@pytest.fixture
def routed_config(tmp_path, seed_router_dir):
    """The packaged default with the session's seed-trained router copied in (own SQLite, own versions)."""
    import shutil

    config = packaged_config(tmp_path / "data")
    shutil.copytree(seed_router_dir, config.data_path / "router")
    return config


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """One JSON object a line, as the labelled data files are written."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def long_conversation(exchanges: int) -> list[dict]:
    """``exchanges`` user/assistant turns, then a final question: a history that outgrows a small context."""
    history = []
    for i in range(exchanges):
        history += [
            {"role": "user", "content": f"question {i} about the quick brown fox"},
            {"role": "assistant", "content": "the lazy dog answer"},
        ]
    return history + [{"role": "user", "content": "the final question"}]
