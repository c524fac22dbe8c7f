"""One error root for everything the engine can name, so each front end maps errors in one place.

::

    CoEError
    ├── InvalidRequest      the request itself is wrong; nothing ran, nothing was logged      (API 4xx)
    │   ├── PromptTooLong   over limits.max_prompt_chars / limits.max_messages
    │   └── RateLimited     over a per-session limit (limits.feedback_per_minute)
    ├── Unavailable         the CoE cannot serve this now; the request was fine                (API 503)
    │   ├── ExpertUnavailable   an expert cannot be served (missing weights, load failed, ...)
    │   │   └── RemoteExpertError   a remote expert is down, too slow or answered nonsense
    │   └── Busy            try again shortly (``retry_after_s``)                              (API 429)
    │       ├── TierBusy    the execution tier is full of experts that are generating
    │       └── QueueFull   serve.max_queue turns wait already
    ├── StoreError          the interaction store (coe_core/store/errors.py has its subclasses)
    └── ConfigError         spaces.yaml or the environment is wrong

Every message says what to do. The classes keep the builtin base they had before this module existed
(``ValueError`` for a bad request or config, ``RuntimeError`` for the rest), so code that still catches those
stays correct. The modules that raise them re-export them under their old names.
"""

from __future__ import annotations


class CoEError(Exception):
    """Root of every error the engine raises on purpose; its message is one sentence a user can act on."""


# -- the caller's fault --------------------------------------------------------------------------------
class InvalidRequest(CoEError, ValueError):
    """The request itself is wrong (empty prompt, bad messages, unknown expert or category, bad override or
    parameter); nothing ran and nothing was logged."""


class PromptTooLong(InvalidRequest):
    """The conversation is longer than ``limits.max_prompt_chars`` or ``limits.max_messages``."""


class RateLimited(InvalidRequest):
    """One session (or key) sent more than its limit (``limits.feedback_per_minute``)."""

    retry_after_s: int = 60


# -- the CoE cannot serve it now -----------------------------------------------------------------------
class Unavailable(CoEError, RuntimeError):
    """The request is fine but the CoE cannot serve it now: no expert can, the tiers or the queue are full, a
    remote expert is down, no router can be loaded."""


class ExpertUnavailable(Unavailable):
    """An expert cannot be served; the message says why and what to do. Other experts keep serving."""


class RemoteExpertError(ExpertUnavailable):
    """The remote server is down, too slow, refused the request or answered something that is not the
    OpenAI streaming format. The message says which and names the server."""


class Busy(Unavailable):
    """Full right now; ``retry_after_s`` estimates when to try again."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TierBusy(Busy):
    """The execution tier is full of experts that are generating right now; try again shortly."""


class QueueFull(Busy):
    """The serving queue holds ``serve.max_queue`` turns already; ``retry_after_s`` estimates when one will
    have left."""


# -- where things are kept or configured ---------------------------------------------------------------
class StoreError(CoEError, RuntimeError):
    """A problem with the interaction store (bad id, bad URL, bad feedback kind, a database that failed...)."""


class ConfigError(CoEError, ValueError):
    """A user-fixable problem in spaces.yaml or the environment; the message says what to do."""


def error_message(exc: BaseException) -> str:
    """The one-line message of an error (a ``KeyError`` quotes its argument: unquoted here)."""
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return str(exc) or type(exc).__name__
