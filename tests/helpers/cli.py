"""What the CLI tests share: the one `error: ...` line a user error must end in, and a guard that the
arguments were checked before any model loads."""

from __future__ import annotations

from typing import Callable, Sequence

import pytest


def error_line(main: Callable[[Sequence[str]], object], argv: Sequence[str]) -> str:
    """The message `main(argv)` exits with; it must be one `error: ...` line."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    message = exit_.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


def refuse_loading(monkeypatch, module, attribute: str) -> None:
    """Fails the test if `module.attribute` (the model loader) is called."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(module, attribute, refuse)
