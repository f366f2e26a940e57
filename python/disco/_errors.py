"""DiscoError: a failed C call, with its code and disco_last_error() text."""

from __future__ import annotations

from . import _lib


class DiscoError(RuntimeError):
    """A disco_* call returned something other than DISCO_SUCCESS.

    ``code`` is the numeric disco_result_t, ``name`` its name
    ("DISCO_ERR_CAPACITY"), ``message`` the library's disco_last_error() text,
    which names the argument, the rank and the row. Input errors found by the
    Python layer before any C call are ValueError/TypeError instead.
    """

    def __init__(self, code: int, name: str, message: str, function: str = ""):
        self.code = code
        self.name = name
        self.message = message
        self.function = function
        text = f"{name}: {message}" if message else name
        super().__init__(text)


def check(code: int, function: str) -> None:
    """Raise DiscoError for a non-success code.

    Must run on the thread that made the call, right after it:
    disco_last_error() is thread-local and overwritten by the next call.
    """
    if code == 0:
        return
    lib = _lib.lib()
    message = (lib.disco_last_error() or b"").decode("utf-8", "replace")
    name = (lib.disco_result_name(code) or b"").decode()
    if not name or name == "DISCO_ERR_UNKNOWN":
        name = _lib.RESULT_NAMES[code] if 0 <= code < len(_lib.RESULT_NAMES) else f"code {code}"
    if not message:
        message = f"{function}: " + (lib.disco_result_string(code) or b"").decode()
    raise DiscoError(code, name, message, function)
