"""Helpers shared by CLI commands: settings, the store, user text as data, clean errors.

Two rules hold for every command:

* **User text is data.** Keys, file names, labels, groups, model names, batch IDs, reasons and
  paths never reach Rich as markup: they go through :func:`shown` (markup escaped, control
  and bidi characters shown as ``\\x1b``, ``\\n``, ``\\u202e``) or are printed with
  ``markup=False`` after :func:`kiban.text.printable`. JSON output goes through
  :func:`print_json`, which keeps the document valid and escapes what a terminal would act on.
* **A failure is one line and exit status 2.** :func:`fails_cleanly` turns any exception of a
  command into ``error: <what is wrong>`` on stderr (secrets redacted, no traceback; the
  traceback is logged at DEBUG), and :class:`OneLineErrors` does the same for the usage
  errors typer and click raise before a command runs (unknown option, value out of range).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

try:  # typer vendors click as typer._click (0.2x); older releases use click itself
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException, NoArgsIsHelpError  # type: ignore[assignment]

from kiban import messages
from kiban.errors import KibanError
from kiban.messages import NAME_PATTERN
from kiban.settings import Settings, load_settings, use_settings
from kiban.store import ObjectStore, open_store
from kiban.telemetry import redact, setup_logging
from kiban.text import one_line, printable

# Nothing outside the store: ONNX Runtime's telemetry (a device ID and an event database under
# ~/.cache/Microsoft, a session file in $TMPDIR) is off before any command imports it.
os.environ["ORT_DISABLE_TELEMETRY"] = "1"

# Tables stay readable when output is piped (CI logs, files): no 80-column squeeze. No emoji
# codes: a label ":warning:" is shown as typed, not as a symbol.
console = Console(width=None if sys.stdout.isatty() else 200, emoji=False)
err_console = Console(stderr=True, emoji=False, highlight=False)

log = logging.getLogger("kiban.cli")

F = TypeVar("F", bound=Callable[..., Any])

#: The largest k of MV@k / acc@k (the messages' limit, ``kiban.messages.RunPlan.k``).
MAX_K = messages.MAX_K  # the message schema's bound: one limit, one place
#: An error line longer than this is cut (a 10 000-character label stays readable).
MAX_ERROR_CHARS = 2000


def shown(text: object) -> str:
    """``text`` for a Rich markup string: control/bidi characters escaped, markup escaped."""
    value = escape(printable(text))
    # escape() doubles a trailing backslash so that it cannot escape a tag placed right after
    # it; an empty null-style tag after it keeps it one literal backslash wherever it lands.
    return value + "[none][/none]" if value.endswith("\\") else value


_JSON_UNSAFE = re.compile(
    "[\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029\ud800-\udfff]"
)


def json_text(data: Any) -> str:
    """Indented JSON that a terminal shows as it is: C0 controls are escaped by ``json`` and
    DEL, C1, bidi overrides, line separators and lone surrogates here, as ``\\uXXXX``.
    Everything else (accents, CJK, emoji) stays readable; the document parses to ``data``."""
    text = json.dumps(data, indent=2, ensure_ascii=False)
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def print_json(data: Any) -> None:
    """Machine-readable output: exactly the JSON document, never read as markup."""
    console.print(json_text(data), markup=False, highlight=False, soft_wrap=True, emoji=False)


def print_text(text: object, keep: str = "") -> None:
    """A line (or, with ``keep="\\n"``, a document) of data, printed literally."""
    console.print(printable(text, keep), markup=False, highlight=False, soft_wrap=True)


def error_line(message: object) -> str:
    """One printable line: line breaks folded, controls escaped, secrets redacted, capped."""
    line = one_line(redact(str(message)))
    if len(line) > MAX_ERROR_CHARS:
        line = line[: MAX_ERROR_CHARS - 1] + "…"
    return line


def fail(message: object, code: int = 2) -> NoReturn:
    """Print ``error: message`` as one line on stderr and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {shown(error_line(message))}", soft_wrap=True)
    raise typer.Exit(code)


def describe(exc: BaseException) -> str:
    """What went wrong, for a person: the message of a kiban error, the first problem of a
    validation error, the system's words for an OS error, else type and message."""
    if isinstance(exc, KibanError):
        return str(exc)
    if isinstance(exc, ValidationError):
        errors = exc.errors(include_url=False, include_input=False)
        first = errors[0] if errors else {"loc": (), "msg": str(exc)}
        where = ".".join(str(p) for p in first["loc"])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return f"invalid {exc.title}: {where + ': ' if where else ''}{first['msg']}{more}"
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def fails_cleanly(fn: F) -> F:
    """Any exception of the command becomes one red line on stderr and exit code 2.

    Exit requests and usage errors (``typer.Exit``, click exceptions) pass through: the
    command line's own handler (:class:`OneLineErrors`) prints those. The traceback of an
    unexpected error is logged at DEBUG (``KIBAN_LOG_LEVEL=DEBUG``), redacted."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, ClickException):
            raise
        except Exception as exc:
            if not isinstance(exc, (KibanError, ValidationError)):
                log.debug("%s failed", fn.__name__, exc_info=True)
            fail(describe(exc))

    return wrapper  # type: ignore[return-value]


class OneLineErrors(TyperGroup):
    """The ``kiban`` group: a usage error (unknown option, bad value, missing argument) is
    one line ``error: <command>: <problem>`` and exit status 2, like every other failure —
    not typer's boxed panel with the usage text. ``kiban`` alone still prints the help."""

    def main(  # type: ignore[override]
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            where = f"{ctx.command_path}: " if ctx is not None else ""
            err_console.print(
                f"[bold red]error:[/] {shown(error_line(where + exc.format_message()))}",
                soft_wrap=True,
            )
            sys.exit(2)
        except typer.Abort:
            err_console.print("[bold red]error:[/] aborted", soft_wrap=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


def parse_ks(k: str) -> list[int]:
    """``--k 1,3,5`` → [1, 3, 5]: integers from 1 to MAX_K, or one clear error."""
    try:
        ks = sorted({int(v) for v in k.split(",") if v.strip()})
    except ValueError:
        raise KibanError(f"--k must be comma-separated integers, got {k!r}") from None
    if not ks or ks[0] < 1 or ks[-1] > MAX_K:
        raise KibanError(f"--k values must be integers from 1 to {MAX_K}, got {k!r}")
    return ks


_NAME = re.compile(NAME_PATTERN)


def check_name(value: str, what: str = "batch ID") -> str:
    """A batch ID or model name as the messages accept it (letters, digits, ``. _ -``)."""
    if not _NAME.match(value):
        raise KibanError(
            f"invalid {what} '{printable(value)[:200]}': use letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit, at most 128 characters)"
        )
    return value


#: Seconds the command line waits for a Qdrant server before saying it is unreachable.
QDRANT_WAIT_SECONDS = 5


def check_vector_server(settings: Settings) -> None:
    """Embedded runs with ``KIBAN_QDRANT_URL``: fail at once, in one line, when the server
    does not answer — not after every chunk's retries. (Distributed, the workers reach the
    server, perhaps by another name: not checked here.)"""
    if settings.mode != "embedded" or not settings.qdrant_url:
        return
    import warnings

    from qdrant_client import QdrantClient

    key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
    with warnings.catch_warnings():  # "API key over http" and version notes: not one line
        warnings.simplefilter("ignore")
        client = QdrantClient(
            url=settings.qdrant_url,
            api_key=key,
            timeout=QDRANT_WAIT_SECONDS,
            check_compatibility=False,
        )
        try:
            client.get_collections()
        except Exception as exc:
            raise KibanError(
                f"Qdrant server {settings.qdrant_url} (KIBAN_QDRANT_URL) does not answer: "
                f"{describe(exc)}"
            ) from None
        finally:
            client.close()


def keep_caches_home(settings: Settings) -> None:
    """Caches of the libraries a command runs go under ``KIBAN_HOME/cache``, not ``$HOME``:
    matplotlib (the report's figures) writes its font list and config to ``MPLCONFIGDIR``.
    A value the user set is kept."""
    os.environ.setdefault("MPLCONFIGDIR", str((settings.home / "cache" / "matplotlib").resolve()))


class _StatedElsewhere(logging.Filter):
    """Drops kiban.tasks' "dead-lettered …" line in the command line's own process: a stage
    that failed for good is the command's one error line, a failed chunk is in the report."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("dead-lettered ")


def _quiet_in_process_failures() -> None:
    """Embedded, tasks run in this process. Their failures reach the person once, in one line
    (above); Celery's tracer would add a traceback for each."""
    logging.getLogger("celery.app.trace").setLevel(logging.CRITICAL)
    tasks_log = logging.getLogger("kiban.tasks")
    if not any(isinstance(f, _StatedElsewhere) for f in tasks_log.filters):
        tasks_log.addFilter(_StatedElsewhere())


def settings_and_store() -> tuple[Settings, ObjectStore]:
    settings = load_settings()
    use_settings(settings)
    setup_logging(settings.log_level)
    keep_caches_home(settings)
    if settings.log_level != "DEBUG":
        _quiet_in_process_failures()
    store = open_store(
        settings.resolved_store_uri, settings.s3_endpoint_url, settings.s3_region, create=True
    )
    return settings, store


#: A command line sending one message waits this long for the broker, then says so.
BROKER_WAIT_SECONDS = 5


@contextlib.contextmanager
def bounded_broker_waits() -> Iterator[None]:
    """A person at the terminal gets an answer in seconds: connecting, reading and re-trying
    the publish are bounded while this command sends (workers keep Celery's patient
    defaults); afterwards the settings are restored and those connections dropped."""
    from kiban.celery_app import app

    keys = (
        "broker_transport_options",
        "broker_connection_timeout",
        "broker_connection_max_retries",
        "task_publish_retry_policy",
    )
    saved = {key: app.conf.get(key) for key in keys}
    options = dict(saved["broker_transport_options"] or {})
    options.update(
        socket_connect_timeout=BROKER_WAIT_SECONDS,
        socket_timeout=2 * BROKER_WAIT_SECONDS,
        max_retries=1,
    )
    app.conf.update(
        broker_transport_options=options,
        broker_connection_timeout=BROKER_WAIT_SECONDS,
        broker_connection_max_retries=1,
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
    )
    try:
        yield
    finally:
        app.conf.update(saved)
        pool = getattr(app, "_pool", None)  # connections made with the short waits
        if pool is not None:
            with contextlib.suppress(Exception):
                pool.force_close_all()
            app._pool = None
        if getattr(app.amqp, "_producer_pool", None) is not None:
            app.amqp._producer_pool = None
