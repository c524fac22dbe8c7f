"""How the app says an error, in one place: one sentence for a toast or a chat message (``user_message``), or a
``gr.Error`` with a title for a gradio_client caller (``app_error``). The kinds are the engine's
(``coe_core/errors.py``); anything else is shown by its message."""

from __future__ import annotations

import gradio as gr

from coe_core.errors import Busy, CoEError, ConfigError, InvalidRequest, StoreError, Unavailable, error_message

#: what the app's handlers catch from the engine: the errors it raises on purpose
ENGINE_ERRORS = (CoEError,)

_TITLES: tuple[tuple[type[CoEError], str], ...] = (
    (InvalidRequest, "Invalid request"),
    (Busy, "Busy"),
    (Unavailable, "Unavailable"),
    (StoreError, "Interaction log"),
    (ConfigError, "Configuration"),
)


def user_message(exc: BaseException) -> str:
    """One line a visitor can act on: the error's own message, plus when to try again for a busy CoE and what
    the log or the configuration has to do with it."""
    message = error_message(exc)
    if isinstance(exc, Busy) and "try again" not in message:
        return f"{message}; try again in about {exc.retry_after_s} s"
    if isinstance(exc, StoreError) and not isinstance(exc, InvalidRequest):
        return f"the interaction log: {message}"
    if isinstance(exc, ConfigError):
        return f"the configuration: {message}"
    return message


def app_error(exc: BaseException) -> gr.Error:
    """The ``gr.Error`` a gradio_client caller gets (``AppError`` there), titled by the kind of error."""
    title = next((t for kind, t in _TITLES if isinstance(exc, kind)), "Error")
    return gr.Error(user_message(exc), title=title)
