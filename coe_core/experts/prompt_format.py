"""How an expert sees a conversation: its chat template, or a plain format for base models.

Input longer than the expert's context is truncated from the oldest turns (the system prompt and the latest
user turn are kept); if the latest turn alone is too long, its beginning is cut. The result says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from coe_core.config import ExpertConfig

PLAIN_USER, PLAIN_ASSISTANT = "Question:", "Answer:"
#: One worked example: base models follow a demonstrated Question/Answer turn far better than an instruction
#: (seen here: without it Gemma 3 270M base sometimes echoed the system text instead of answering).
PLAIN_EXAMPLE = [
    {"role": "user", "content": "What gas do plants take in for photosynthesis?"},
    {
        "role": "assistant",
        "content": "Plants take in carbon dioxide (CO2) from the air and, using light, turn it "
        "into sugar, releasing oxygen.",
    },
]


@dataclass
class FormattedPrompt:
    input_ids: list[int]
    truncated: bool = False
    notice: str | None = None


def uses_chat_template(tokenizer, cfg: ExpertConfig) -> bool:
    if cfg.prompt_format == "plain":
        return False
    has = bool(getattr(tokenizer, "chat_template", None))
    if cfg.prompt_format == "chat_template" and not has:
        raise ValueError("prompt_format is chat_template but the tokenizer has no chat template: use plain or auto")
    return has


def with_system(messages: list[dict], cfg: ExpertConfig) -> list[dict]:
    """The expert's system prompt first, unless the conversation brings its own."""
    if cfg.system_prompt and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": cfg.system_prompt}, *messages]
    return list(messages)


def render_plain(messages: list[dict], *, open_answer: bool = True) -> str:
    """Plain format for base models: the system text, then Question/Answer pairs, ending in an open Answer."""
    parts = []
    system = [m for m in messages if m["role"] == "system"]
    messages = system[:1] + PLAIN_EXAMPLE + [m for m in messages if m["role"] != "system"]
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"].strip())
        elif m["role"] == "user":
            parts.append(f"{PLAIN_USER} {m['content'].strip()}")
        else:
            parts.append(f"{PLAIN_ASSISTANT} {m['content'].strip()}")
    text = "\n\n".join(parts)
    return f"{text}\n{PLAIN_ASSISTANT}" if open_answer else text


def render(tokenizer, messages: list[dict], cfg: ExpertConfig) -> list[int]:
    """Token ids of the conversation, ready for the assistant's answer."""
    if uses_chat_template(tokenizer, cfg):
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # templates without a system role (jinja raises): fold it into the first user turn
            text = tokenizer.apply_chat_template(_fold_system(messages), tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(render_plain(messages), add_special_tokens=True)["input_ids"]


def _fold_system(messages: list[dict]) -> list[dict]:
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], list(messages[1:])
    if rest and rest[0]["role"] == "user":
        rest[0] = {"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}
    return rest


def format_prompt(
    tokenizer, messages: list[dict], cfg: ExpertConfig, *, context_length: int, reserve_tokens: int
) -> FormattedPrompt:
    """Render within ``context_length - reserve_tokens`` tokens, dropping the oldest turns first."""
    limit = max(context_length - reserve_tokens, 16)
    convo = with_system(messages, cfg)
    ids = render(tokenizer, convo, cfg)
    if len(ids) <= limit:
        return FormattedPrompt(ids)
    original = len(ids)
    system = convo[:1] if convo and convo[0]["role"] == "system" else []
    turns = convo[len(system) :]
    # One pass, not one render per dropped turn: binary search over where the kept history starts (always at a
    # user turn). Fewer turns never render longer, so the first start that fits is the longest history that
    # fits: O(log n) renders instead of O(n) (10,000 short messages took minutes the old way).
    starts = [i for i, m in enumerate(turns) if m["role"] == "user" and i > 0]
    lo, hi, best = 0, len(starts) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        candidate = render(tokenizer, system + turns[starts[mid] :], cfg)
        if len(candidate) <= limit:
            best, hi = (starts[mid], candidate), mid - 1
        else:
            lo = mid + 1
    if best is not None:
        dropped = sum(1 for m in turns[: best[0]] if m["role"] == "user")
        return FormattedPrompt(
            best[1],
            True,
            f"The conversation ({original} tokens) was longer than the expert's "
            f"context: the {dropped} oldest turn(s) were left out.",
        )
    turns = turns[-1:]
    ids = render(tokenizer, system + turns, cfg)
    # The latest message alone is too long: keep its end (the question usually comes last).
    last = turns[-1]["content"]
    tokens = tokenizer(last, add_special_tokens=False)["input_ids"]
    overhead = len(ids) - len(tokens)
    keep = max(limit - overhead - 8, 8)
    cut = tokenizer.decode(tokens[-keep:], skip_special_tokens=True)
    ids = render(tokenizer, [*system, {"role": "user", "content": cut}], cfg)
    return FormattedPrompt(
        ids[-limit:],
        True,
        f"The prompt ({original} tokens) was longer than the expert's context: only its last {keep} tokens were kept.",
    )


def reference_ids(tokenizer, messages: list[dict], reference: str, cfg: ExpertConfig) -> tuple[list[int], list[int]]:
    """(prompt ids, reference answer ids) exactly as generation would see the answer."""
    convo = with_system(messages, cfg)
    prompt = render(tokenizer, convo, cfg)
    if uses_chat_template(tokenizer, cfg):
        answer = reference
    else:
        answer = " " + reference.strip()
    ref = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return prompt, ref
