"""What every command shares: error translation to exit codes, logging set-up, JSON output."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from ctcovid.errors import CtCovidError
from ctcovid.logs import configure_logging, quiet_tensorflow

F = TypeVar("F", bound=Callable[..., Any])

# The audit trail (ctcovid.audit) of ``listen`` and ``batch``.
AuditFileOption = Annotated[
    Path | None,
    typer.Option(
        "--audit-file",
        dir_okay=False,
        help="Append DICOM audit messages (PS3.15 A.5), one XML message a line, to this file.",
    ),
]
AuditSyslogOption = Annotated[
    str | None,
    typer.Option(
        "--audit-syslog",
        help="Send audit messages to this Audit Record Repository, HOST:PORT, syslog over TLS "
        "(RFC 5425); spooled on disk while it is unreachable. Needs --audit-ca.",
    ),
]
AuditCaOption = Annotated[
    Path | None,
    typer.Option(
        "--audit-ca",
        exists=True,
        dir_okay=False,
        help="CA certificate (PEM) the repository's TLS certificate must be signed by.",
    ),
]

# Results to the RIS (HL7 v2.5.1 ORU^R01 over MLLP) from ``listen`` and ``batch``; unset options
# fall back to the node's settings file, then to ``OruSettings``' defaults.
HL7_PANEL = "Results to the RIS"
Hl7Option = Annotated[
    str | None,
    typer.Option(
        "--hl7",
        help="Also send each result to the RIS as an HL7 v2.5.1 ORU^R01 over MLLP, HOST:PORT "
        "(off by default).",
        rich_help_panel=HL7_PANEL,
    ),
]
Hl7TlsOption = Annotated[
    bool | None,
    typer.Option(
        "--hl7-tls/--no-hl7-tls",
        help="Send the ORUs over TLS (1.2 or later): the RIS's certificate is verified against "
        "--tls-ca (default: the system's CAs) and --tls-cert/--tls-key are shown as ours. "
        "Default off.",
        show_default=False,
        rich_help_panel=HL7_PANEL,
    ),
]
Hl7SendingApplicationOption = Annotated[
    str | None,
    typer.Option(
        "--hl7-sending-application",
        help="MSH-3 of the ORU. Default CTCOVID.",
        rich_help_panel=HL7_PANEL,
    ),
]
Hl7SendingFacilityOption = Annotated[
    str | None,
    typer.Option("--hl7-sending-facility", help="MSH-4 of the ORU.", rich_help_panel=HL7_PANEL),
]
Hl7ReceivingApplicationOption = Annotated[
    str | None,
    typer.Option(
        "--hl7-receiving-application", help="MSH-5 of the ORU.", rich_help_panel=HL7_PANEL
    ),
]
Hl7ReceivingFacilityOption = Annotated[
    str | None,
    typer.Option("--hl7-receiving-facility", help="MSH-6 of the ORU.", rich_help_panel=HL7_PANEL),
]
Hl7PriorityOption = Annotated[
    list[str] | None,
    typer.Option(
        "--hl7-priority",
        help="Worklist priority of a result, LABEL=CODE (HL7 table 0027; repeatable). "
        "Default covid=S.",
        rich_help_panel=HL7_PANEL,
    ),
]
Hl7PriorityFieldOption = Annotated[
    list[str] | None,
    typer.Option(
        "--hl7-priority-field",
        help="Field the priority goes to: ORC-7, OBR-27, TQ1-9 (repeatable). "
        "Default ORC-7 and OBR-27.",
        rich_help_panel=HL7_PANEL,
    ),
]

# The --model option of every command that runs a model.
ModelOption = Annotated[
    Path | None,
    typer.Option(
        "--model",
        help="Model folder. Default: $CTCOVID_MODEL, else ~/.local/share/ctcovid/model.",
    ),
]


class Runtime(StrEnum):
    """How the model runs (ctcovid.model.runtimes); fixed choices for every command."""

    auto = "auto"
    keras = "keras"
    onnx = "onnx"
    int8 = "int8"
    openvino = "openvino"
    bf16 = "bf16"
    openvino_int8 = "openvino-int8"


RUNTIME_HELP = (
    "How the model runs: auto (the fastest graph the model folder holds that is verified on this "
    "CPU: bf16 where it has AMX-BF16, openvino-int8, int8, onnx, then keras), keras, onnx (fp32 "
    "graph), int8, openvino "
    "(fp32 graph on OpenVINO), bf16 (fp32 graph on OpenVINO at bf16, CPUs with BF16 only) or "
    "openvino-int8 (int8 graph on OpenVINO); see 'ctcovid export'."
)


# Markup off: what we print carries paths, values from files and hints such as
# "pip install 'ctcovid[dicomweb]'", "[::1]" or "(0028,0010)", which markup would eat or restyle.
# Styles are given as Text objects where we want them.
console = Console(stderr=True, markup=False)
stdout = Console(markup=False)


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    """Log to stderr (see :func:`ctcovid.logs.configure_logging`)."""
    configure_logging(verbose, quiet=quiet)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a one-line reason and return the Exit to raise."""
    console.print(
        Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True
    )
    return typer.Exit(code=code)


def handle_errors(fn: F) -> F:
    """Expected failures (bad input, missing model) exit 1 with one line; anything else exits 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except CtCovidError as exc:
            raise fail(str(exc), 1) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except Exception as exc:  # an internal failure: say so, keep the traceback in debug logs
            logging.getLogger("ctcovid").debug("internal error", exc_info=True)
            raise fail(f"internal error: {type(exc).__name__}: {exc}", 2) from None

    return wrapper  # type: ignore[return-value]


def parse_settings(pairs: list[str] | None, option: str) -> dict[str, Any]:
    """``["a=1", "b=lung", "c=null"]`` -> ``{"a": 1, "b": "lung", "c": None}`` (JSON values,
    else strings); a pair without ``=`` is a usage error naming the option."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint=option)
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        out[key.strip()] = value
    return out


def _default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def print_json(data: Any) -> None:
    """Machine-readable output on stdout, nothing else there."""
    sys.stdout.write(json.dumps(data, indent=2, default=_default) + "\n")
    sys.stdout.flush()


def quiet_keras() -> None:
    """Silence TensorFlow's start-up chatter before Keras is imported (when logging was not set
    up by :func:`setup_logging`, which already does)."""
    quiet_tensorflow(0)
