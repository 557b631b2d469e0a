"""The node's HTTP server: status page, JSON API, probes and Prometheus metrics, on one port.

Built on Starlette and served by uvicorn in a thread of the node process, with its own
connection to the job database: a crashed, slow or flooded web server never holds up receiving
or classifying (at most ``MAX_CONNECTIONS`` requests at once, more are answered 503; idle
connections closed after ``KEEP_ALIVE_SECONDS``, and those whose request headers have not
arrived whole after ``HEADER_SECONDS``). Needs ``pip install 'ctcovid[web]'``.

``GET /``                                    the status page (refreshes itself)
``GET /series/{study}/{series}``             one series: result, slice plot, heatmaps, history
``GET /series/{study}/{series}/heatmap/{n}.png``   the n-th key slice's heatmap (PNG, pixels only)
``GET /healthz``                             200 ``{"status": "ok"}`` while the server runs
``GET /readyz``                              200 ready / 503 not, with each check (see health)
``GET /metrics``                             Prometheus metrics
``GET /api/status``                          node identity, model, checks, counts
``GET /api/series?state=&accession=&limit=&offset=``   series, newest first
``GET /api/series/{study}/{series}``         one series with slice probabilities and history
``POST /api/series/{study}/{series}/retry``  re-queue a failed series (``ctcovid queue --retry``)

Access: no patient name, ID or birth date anywhere unless ``http_show_phi``; accession numbers
are shown. Every POST needs the page's CSRF token (form field ``csrf_token`` or header
``X-CSRF-Token``) or an API token (``Authorization: Bearer``). With ``http_auth_file`` every
route but the probes needs credentials (see :mod:`ctcovid.node.webauth`). On loopback the
``Host`` header must name loopback too (no DNS rebinding).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from ctcovid import __version__
from ctcovid.dicom.uids import valid_uid
from ctcovid.errors import ConfigError
from ctcovid.node.config import RIS_DESTINATION, NodeConfig, is_loopback
from ctcovid.node.files import MAX_HEATMAPS
from ctcovid.node.health import (
    Check,
    DestinationProbe,
    check_database,
    check_disk,
    check_model,
    check_worker,
)
from ctcovid.node.jobs import FAILED, STATES, SeriesRecord
from ctcovid.node.store import NotRetryable, Store
from ctcovid.node.webauth import Credentials, LoginGuard

logger = logging.getLogger(__name__)

TEMPLATES = Path(__file__).with_name("templates")
MAX_CONNECTIONS = 32
KEEP_ALIVE_SECONDS = 5
# A request's headers must arrive whole within this time, or its connection is closed (a slow
# client cannot hold one of the MAX_CONNECTIONS slots).
HEADER_SECONDS = 10.0
PAGE_REFRESH_SECONDS = 10
PAGE_SIZE = 50
MAX_LIMIT = 500
PROBES = frozenset({"/healthz", "/readyz"})
_SECURITY_HEADERS = {
    # No script at all; styles inline; images only inline SVG or data.
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def require_web() -> None:
    """Fail with the install line when the web extra is missing."""
    try:
        import jinja2  # noqa: F401
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"--http-port needs the web extra ({exc.name} is missing): pip install 'ctcovid[web]'"
        ) from None


def _iso(timestamp: float | None) -> str | None:
    if not timestamp:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds")


@dataclass
class WebContext:
    """What the server shows and may do; the node fills it, tests build one directly."""

    config: NodeConfig
    store: Store
    model: dict[str, Any]
    # The worker's heartbeat (time.monotonic() of its last progress; 0: starting; None: none).
    heartbeat: Callable[[], float | None] = lambda: None
    destination: DestinationProbe | None = None
    metrics: Any = None
    dicom_port: Callable[[], int] | None = None
    started: float = field(default_factory=time.time)
    # Called with (the user tried, the client address) on a failed login: the audit trail.
    on_login_failed: Callable[[str, str], None] | None = None
    _patients: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.destination is None:
            self.destination = DestinationProbe(self.config)

    def checks(self) -> dict[str, Check]:
        config = self.config
        assert self.destination is not None
        return {
            "database": check_database(self.store.db_path),
            "disk": check_disk(self.store.root, self.store.min_free_bytes),
            "worker": check_worker(self.heartbeat(), config.worker_stall_seconds),
            "destination": self.destination.check(),
            "model": check_model(self.model),
        }

    def identity(self) -> dict[str, Any]:
        config = self.config
        return {
            "ae_title": config.ae_title,
            "host": config.host,
            "port": self.dicom_port() if self.dicom_port is not None else config.port,
            "tls": config.tls,
            "client_certificates": config.tls_ca is not None,
            "allow_aet": list(config.allow_aet),
            "destination": config.sr_destination,
            "destinations": self.destinations(),
            "version": __version__,
            "started": _iso(self.started),
        }

    def destinations(self) -> list[dict[str, str]]:
        """Where results go besides the SR's destination: the RIS (``hl7``) and the named
        destinations, each with its kind and address (never credentials)."""
        config = self.config
        out = []
        if config.hl7 is not None:
            out.append({"name": RIS_DESTINATION, "kind": "hl7", "address": str(config.hl7)})
        out += [{"name": d.name, "kind": d.kind, "address": d.address} for d in config.destinations]
        return out

    def patient(self, record: SeriesRecord) -> dict[str, str]:
        """Name, ID and birth date from the series' first stored instance (cached)."""
        key = (record.study_instance_uid, record.series_instance_uid)
        if key not in self._patients:
            found = {"name": "", "id": "", "birth_date": ""}
            paths = self.store.instance_paths(record.series_instance_uid, key[0])
            if paths:
                import pydicom

                try:
                    ds = pydicom.dcmread(
                        paths[0],
                        stop_before_pixels=True,
                        specific_tags=["PatientName", "PatientID", "PatientBirthDate"],
                    )
                    found = {
                        "name": str(ds.get("PatientName", "") or ""),
                        "id": str(ds.get("PatientID", "") or ""),
                        "birth_date": str(ds.get("PatientBirthDate", "") or ""),
                    }
                except Exception:
                    logger.debug("patient data unreadable", exc_info=True)
            if len(self._patients) > 10_000:
                self._patients.clear()
            self._patients[key] = found
        return self._patients[key]

    def series_json(self, record: SeriesRecord, *, detail: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "study_instance_uid": record.study_instance_uid,
            "series_instance_uid": record.series_instance_uid,
            "accession_number": record.accession_number,
            "state": record.state.value,
            "reason": record.reason,
            "rule": record.rule,
            "received": _iso(record.last_received),
            "updated": _iso(record.updated_at),
            "instances": record.n_instances,
            "probability_covid": record.probability_covid,
            "label": record.label,
            "sr_instance_uid": record.sr_sop_instance_uid,
            "attempts": record.attempts,
        }
        if self.config.http_show_phi:
            out["patient"] = self.patient(record)
        if detail:
            out["revision"] = record.revision
            out["sent_revision"] = record.sent_revision
            out["classify_seconds"] = record.classify_seconds
            try:
                out["slice_probabilities"] = json.loads(record.slice_probabilities or "[]")
            except ValueError:
                out["slice_probabilities"] = []
            count = self.store.files.heatmap_count(
                record.study_instance_uid, record.series_instance_uid
            )
            out["heatmaps"] = [
                f"/series/{record.study_instance_uid}/{record.series_instance_uid}/heatmap/{n}.png"
                for n in range(1, count + 1)
            ]
            out["deliveries"] = [
                {
                    "destination": d.destination,
                    "kind": d.kind,
                    "state": d.state.value,
                    "revision": d.revision,
                    "attempts": d.attempts,
                    "next_try": _iso(d.next_try) if d.state == "pending" and d.next_try else "",
                    "reason": d.reason,
                }
                for d in self.store.jobs.deliveries(
                    record.study_instance_uid, record.series_instance_uid
                )
            ]
            out["history"] = [
                {**h, "at": _iso(h["at"])}
                for h in self.store.jobs.history(
                    record.series_instance_uid, record.study_instance_uid
                )
            ]
        return out


def slice_plot_svg(probabilities: list[float], threshold: float = 0.5) -> str:
    """P(COVID) per slice as an inline SVG line plot (no script, no external file)."""
    width, height, pad = 600, 160, 24
    n = len(probabilities)
    if n == 0:
        return ""
    inner_w, inner_h = width - 2 * pad, height - 2 * pad

    def x(i: int) -> float:
        return pad + (inner_w * i / (n - 1) if n > 1 else inner_w / 2)

    def y(p: float) -> float:
        return pad + inner_h * (1.0 - min(1.0, max(0.0, float(p))))

    points = " ".join(f"{x(i):.1f},{y(p):.1f}" for i, p in enumerate(probabilities))
    dots = "".join(
        f'<circle cx="{x(i):.1f}" cy="{y(p):.1f}" r="2.5"><title>slice {i + 1}: '
        f"{float(p):.3f}</title></circle>"
        for i, p in enumerate(probabilities)
    )
    t = y(threshold)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" class="plot" '
        'aria-label="P(COVID) per slice">'
        f'<rect x="{pad}" y="{pad}" width="{inner_w}" height="{inner_h}" fill="none" '
        'stroke="#bbb"/>'
        f'<line x1="{pad}" y1="{t:.1f}" x2="{width - pad}" y2="{t:.1f}" stroke="#c33" '
        'stroke-dasharray="4 3"/>'
        f'<text x="{pad}" y="{pad - 6}" font-size="11">1.0</text>'
        f'<text x="{pad}" y="{height - 6}" font-size="11">0.0 · slices 1–{n}</text>'
        f'<text x="{width - pad - 90}" y="{t - 4:.1f}" font-size="11" fill="#c33">'
        f"threshold {threshold:g}</text>"
        f'<polyline points="{points}" fill="none" stroke="#1f5fa8" stroke-width="2"/>'
        f'<g fill="#1f5fa8">{dots}</g></svg>'
    )


def hourly_svg(counts: dict[str, list[int]], now_hour: int) -> str:
    """Series received and results classified in each hour of today, as inline SVG bars."""
    width, height, pad, hours = 600, 120, 20, 24
    step = (width - 2 * pad) / hours
    top = max([1, *counts["received"], *counts["classified"]])
    bars = []
    for name, shift, colour in (("received", 0.1, "#9bb7d4"), ("classified", 0.5, "#1f5fa8")):
        for hour, n in enumerate(counts[name]):
            if n:
                h = (height - 2 * pad) * n / top
                bars.append(
                    f'<rect x="{pad + step * (hour + shift):.1f}" y="{height - pad - h:.1f}" '
                    f'width="{step * 0.4:.1f}" height="{h:.1f}" fill="{colour}">'
                    f"<title>{hour:02d}:00 {name} {n}</title></rect>"
                )
    ticks = "".join(
        f'<text x="{pad + step * hour:.1f}" y="{height - 6}" font-size="10">{hour:02d}</text>'
        for hour in range(0, hours, 3)
    )
    now = pad + step * (now_hour + 1)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" class="hourly" '
        'aria-label="Series received and classified per hour today">'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
        'stroke="#bbb"/>'
        f'<line x1="{now:.1f}" y1="{pad}" x2="{now:.1f}" y2="{height - pad}" stroke="#ddd"/>'
        f'<text x="{pad}" y="{pad - 6}" font-size="11">{top} (light: received, dark: '
        "classified)</text>"
        f"{''.join(bars)}{ticks}</svg>"
    )


def _today_hourly(ctx: WebContext) -> str:
    now = time.localtime()
    midnight = time.mktime((now.tm_year, now.tm_mon, now.tm_mday, 0, 0, 0, 0, 0, -1))
    return hourly_svg(ctx.store.jobs.per_hour(midnight), now.tm_hour)


def create_app(
    ctx: WebContext,
    *,
    csrf_token: str | None = None,
    credentials: Credentials | None = None,
    allowed_hosts: list[str] | None = None,
) -> Any:
    """The Starlette application over ``ctx``."""
    require_web()
    from jinja2 import Environment, FileSystemLoader, select_autoescape
    from markupsafe import Markup
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
    from starlette.routing import Route

    config = ctx.config
    token = csrf_token or secrets.token_urlsafe(32)
    if credentials is None and config.http_auth_file is not None:
        credentials = Credentials.load(config.http_auth_file)
    guard = LoginGuard(credentials, ctx.on_login_failed) if credentials is not None else None
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape())
    env.filters["prob"] = lambda p: "" if p is None else f"{float(p):.3f}"
    env.filters["when"] = lambda ts: (_iso(ts) or "—").replace("+00:00", "Z")
    env.filters["utc"] = lambda text: (text or "—").replace("T", " ").replace("+00:00", "Z")
    if ctx.metrics is not None and guard is not None:
        ctx.metrics.registry.register(_LoginCollector(guard))

    def page(name: str, request: Request, status: int = 200, **values: Any) -> Response:
        html = env.get_template(name).render(
            csrf_token=token,
            show_phi=config.http_show_phi,
            refresh=PAGE_REFRESH_SECONDS,
            request_path=request.url.path,
            **values,
        )
        return HTMLResponse(html, status_code=status)

    def checks_json() -> tuple[bool, dict[str, Any]]:
        checks = ctx.checks()
        return all(c.ok for c in checks.values()), {k: c.to_dict() for k, c in checks.items()}

    def find(request: Request) -> SeriesRecord | None:
        study = request.path_params["study"]
        series = request.path_params["series"]
        if not (valid_uid(study) and valid_uid(series)):
            return None
        return ctx.store.jobs.get(series, study)

    def csrf_ok(request: Request, form: dict[str, list[str]]) -> bool:
        identity = getattr(request.state, "identity", None)
        if identity is not None and identity.by_token:
            return True
        offered = request.headers.get("x-csrf-token") or (form.get("csrf_token") or [""])[0]
        return bool(offered) and hmac.compare_digest(offered.encode(), token.encode())

    async def read_form(request: Request) -> dict[str, list[str]]:
        if "application/x-www-form-urlencoded" not in request.headers.get("content-type", ""):
            return {}
        body = await request.body()
        if len(body) > 4096:
            return {}
        return parse_qs(body.decode("latin-1"))

    # -- probes and metrics -----------------------------------------------------------------

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    def readyz(request: Request) -> Response:
        ready, checks = checks_json()
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    def metrics(request: Request) -> Response:
        if ctx.metrics is None:
            return JSONResponse({"error": "metrics are not collected"}, status_code=404)
        body, content_type = ctx.metrics.render()
        return Response(body, media_type=content_type)

    # -- API --------------------------------------------------------------------------------

    def _int(request: Request, name: str, default: int, high: int) -> int:
        try:
            return max(0, min(high, int(request.query_params.get(name, default))))
        except ValueError:
            return default

    def api_series(request: Request) -> Response:
        state = request.query_params.get("state") or None
        if state is not None and state not in {s.value for s in STATES}:
            return JSONResponse(
                {"error": f"state must be one of {', '.join(s.value for s in STATES)}"},
                status_code=400,
            )
        total, records = ctx.store.jobs.page(
            state=state,
            accession_number=request.query_params.get("accession") or None,
            limit=_int(request, "limit", PAGE_SIZE, MAX_LIMIT),
            offset=_int(request, "offset", 0, 10**9),
        )
        return JSONResponse({"total": total, "series": [ctx.series_json(r) for r in records]})

    def api_one(request: Request) -> Response:
        record = find(request)
        if record is None:
            return JSONResponse({"error": "no such series"}, status_code=404)
        return JSONResponse(ctx.series_json(record, detail=True))

    def api_status(request: Request) -> Response:
        ready, checks = checks_json()
        return JSONResponse(
            {
                "node": ctx.identity(),
                "model": ctx.model,
                "ready": ready,
                "checks": checks,
                "counts": ctx.store.jobs.counts_by_state(),
                "last": {k: _iso(v) for k, v in ctx.store.jobs.last_times().items()},
            }
        )

    def retry(record: SeriesRecord) -> tuple[int, dict[str, Any]]:
        """The one retry path: :meth:`Store.retry_series`, as ``ctcovid queue --retry``."""
        try:
            requeued = ctx.store.retry_series(record.series_instance_uid, record.study_instance_uid)
        except NotRetryable as exc:
            return (404 if exc.missing else 409), {"error": str(exc)}
        logger.info(
            "event=retried_from_web study=%s series=%s",
            record.study_instance_uid,
            record.series_instance_uid,
        )
        return 200, {"requeued": requeued}

    async def api_retry(request: Request) -> Response:
        form = await read_form(request)
        if not csrf_ok(request, form):
            return JSONResponse({"error": "missing or wrong CSRF token"}, status_code=403)
        record = await run_in_threadpool(find, request)
        if record is None:
            return JSONResponse({"error": "no such series"}, status_code=404)
        status, body = await run_in_threadpool(retry, record)
        return JSONResponse(body, status_code=status)

    # -- pages ------------------------------------------------------------------------------

    def index(request: Request) -> Response:
        accession = (request.query_params.get("accession") or "").strip()[:64]
        state = request.query_params.get("state") or None
        if state not in {s.value for s in STATES}:
            state = None
        total, records = ctx.store.jobs.page(
            state=state, accession_number=accession or None, limit=PAGE_SIZE
        )
        _, failed = ctx.store.jobs.page(state=FAILED.value, limit=PAGE_SIZE)
        checks = ctx.checks()
        return page(
            "index.html",
            request,
            node=ctx.identity(),
            model=ctx.model,
            checks=checks,
            ready=all(c.ok for c in checks.values()),
            counts=ctx.store.jobs.counts_by_state(),
            last=ctx.store.jobs.last_times(),
            hourly=Markup(_today_hourly(ctx)),
            total=total,
            series=[ctx.series_json(r) for r in records],
            failed=[ctx.series_json(r) for r in failed],
            accession=accession,
            state=state or "",
            states=[s.value for s in STATES],
            destination_checked=_iso(ctx.destination.checked_at if ctx.destination else 0),
            message=request.query_params.get("message", "")[:300],
        )

    def series_page(request: Request) -> Response:
        record = find(request)
        if record is None:
            return page("missing.html", request, status=404)
        data = ctx.series_json(record, detail=True)
        threshold = float(ctx.model.get("threshold", 0.5)) if ctx.model else 0.5
        return page(
            "series.html",
            request,
            s=data,
            plot=Markup(slice_plot_svg(data["slice_probabilities"], threshold)),
        )

    def heatmap(request: Request) -> Response:
        record = find(request)
        number = int(request.path_params["number"])
        if record is None or not 1 <= number <= MAX_HEATMAPS:
            return Response("No such heatmap.", status_code=404, media_type="text/plain")
        path = ctx.store.files.heatmap_path(
            record.study_instance_uid, record.series_instance_uid, number
        )
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return Response("No such heatmap.", status_code=404, media_type="text/plain")
        return Response(data, media_type="image/png")

    async def page_retry(request: Request) -> Response:
        form = await read_form(request)
        if not csrf_ok(request, form):
            return HTMLResponse("Missing or wrong CSRF token: reload the page.", 403)
        record = await run_in_threadpool(find, request)
        if record is None:
            return HTMLResponse("No such series.", 404)
        status, body = await run_in_threadpool(retry, record)
        text = (
            f"Series {record.series_instance_uid} re-queued."
            if status == 200
            else str(body.get("error"))
        )
        return RedirectResponse(f"/?message={quote(text)}", status_code=303)

    # -- access -----------------------------------------------------------------------------

    class Access(BaseHTTPMiddleware):
        async def dispatch(self, request: Request, call_next: Any) -> Response:
            if guard is not None and request.url.path not in PROBES:
                address = request.client.host if request.client else "?"
                header = request.headers.get("authorization", "")
                identity = (
                    await run_in_threadpool(guard.authenticate, header, address) if header else None
                )
                if identity is None:
                    delay = guard.delay_for(address)
                    if delay:
                        await asyncio.sleep(delay)
                    return Response(
                        "Authentication required.\n",
                        status_code=401,
                        headers={"WWW-Authenticate": 'Basic realm="ctcovid", charset="UTF-8"'},
                    )
                request.state.identity = identity
            try:
                response: Response = await call_next(request)
            except Exception:  # logged here; the node goes on whatever a request does
                logger.exception("event=http_error path=%s", request.url.path)
                response = JSONResponse({"error": "internal error"}, status_code=500)
            for name, value in _SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)
            return response

    routes = [
        Route("/", index),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/api/status", api_status),
        Route("/api/series", api_series),
        Route("/api/series/{study}/{series}", api_one),
        Route("/api/series/{study}/{series}/retry", api_retry, methods=["POST"]),
        Route("/series/{study}/{series}", series_page),
        Route("/series/{study}/{series}/retry", page_retry, methods=["POST"]),
        Route("/series/{study}/{series}/heatmap/{number:int}.png", heatmap),
    ]
    middleware = [Middleware(Access)]
    if allowed_hosts is None and is_loopback(config.http_host):
        allowed_hosts = ["127.0.0.1", "localhost", "::1", "[::1]", config.http_host]
    if allowed_hosts:
        middleware.insert(0, Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts))
    app = Starlette(routes=routes, middleware=middleware)
    app.state.csrf_token = token
    return app


class _LoginCollector:
    def __init__(self, guard: LoginGuard) -> None:
        self.guard = guard

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        yield CounterMetricFamily(
            "ctcovid_http_login_failures",
            "Failed logins to the node's HTTP server since it started.",
            value=self.guard.failures_total,
        )


def _protocol_with_header_deadline(seconds: float) -> Any:
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete
    ``seconds`` after it opened or after its previous response (uvicorn has no such timeout:
    a client that sends a byte now and then would otherwise keep its connection forever)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):  # type: ignore[misc]
        _deadline: Any = None

        def _arm(self) -> None:
            if self._deadline is None and not self.transport.is_closing():
                self._deadline = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self.cycle is None or self.cycle.response_complete:  # waiting for headers
                self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            if self.cycle is not before:  # a request's headers arrived whole
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return Protocol


class WebServer:
    """uvicorn serving :func:`create_app` in a daemon thread; the port is bound at start, so a
    port in use fails the node's start with the reason."""

    def __init__(self, ctx: WebContext) -> None:
        require_web()
        import uvicorn

        config = ctx.config
        assert config.http_port is not None
        self.ctx = ctx
        self.app = create_app(ctx)
        family = socket.AF_INET6 if ":" in config.http_host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((config.http_host.strip("[]"), config.http_port))
        except OSError as exc:
            self.socket.close()
            raise ConfigError(
                f"--http-port: cannot listen on {config.http_host}:{config.http_port}: {exc}"
            ) from None
        self.socket.listen(128)
        self.port = int(self.socket.getsockname()[1])
        tls = config.http_tls_cert is not None
        self.server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                http=_protocol_with_header_deadline(HEADER_SECONDS),
                limit_concurrency=MAX_CONNECTIONS,
                timeout_keep_alive=KEEP_ALIVE_SECONDS,
                timeout_graceful_shutdown=2,
                h11_max_incomplete_event_size=16 * 1024,
                ssl_certfile=str(config.http_tls_cert) if tls else None,
                ssl_keyfile=str(config.http_tls_key) if tls else None,
                log_level="warning",
                access_log=False,
                lifespan="off",
                server_header=False,
            )
        )
        if tls:  # load the certificate now: a bad one fails the start, not the thread
            try:
                self.server.config.load()
            except Exception as exc:
                self.socket.close()
                raise ConfigError(f"--http-tls-cert/--http-tls-key: {exc}") from None
        self.scheme = "https" if tls else "http"
        self.host = config.http_host
        self.auth = config.http_auth_file is not None
        self.show_phi = config.http_show_phi
        self._thread = threading.Thread(target=self._run, name="ctcovid-http", daemon=True)

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        except BaseException:  # the node goes on receiving and classifying without its page
            logger.exception("event=http_server_died")

    def start(self) -> None:
        self._thread.start()
        logger.info(
            "event=http_listening host=%s port=%d scheme=%s auth=%s show_phi=%s",
            self.host,
            self.port,
            self.scheme,
            self.auth,
            self.show_phi,
        )
        logger.info("event=metrics_listening host=%s port=%d path=/metrics", self.host, self.port)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(5)
        self.socket.close()
