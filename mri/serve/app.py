"""The web app over a scan folder: a JSON API (OpenAPI spec at /openapi.json) and a static front end.

FastAPI's /docs and /redoc pages are off: they load Swagger UI and ReDoc from a CDN, which the app's
Content-Security-Policy (nothing from another origin) blanks, and which would not work offline anyway. The
front end's own `#/api` page lists the endpoints from /openapi.json instead.

    from mri.serve.app import create_app, serve
    app = create_app("scan")            # an ASGI app (FastAPI)
    serve("scan", port=8765)            # or run it with uvicorn, on 127.0.0.1 by default

Every file read for a request is resolved inside the scan folder (or, for the front end's own files,
inside the package's static folder); request bodies, pages, prompts and generation lengths are bounded
and a request past a bound gets a 4xx with a one-line reason.
"""

from __future__ import annotations

import mimetypes
import socket
import threading
import webbrowser
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.middleware.trustedhost import TrustedHostMiddleware

from mri.errors import MriError
from mri.serve.features import SORTS, FeatureIndex, finite
from mri.serve.paths import (
    MAX_BODY_BYTES,
    MAX_EDITS,
    MAX_NEW_TOKENS,
    MAX_PAGE,
    MAX_PROMPT_CHARS,
    MAX_QUERY_CHARS,
    MAX_STRENGTH,
    SERVED_SUFFIXES,
    OutsideRoot,
    inside,
    plain_name,
)
from mri.serve.playground import Edit, Playground
from mri.serve.scan import NotFound, Scan

STATIC = Path(__file__).parent / "static"
LOCAL_HOSTS = ["127.0.0.1", "localhost", "::1", "testserver"]
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
MAX_FEATURE = 2**31 - 1
MAX_LAYERS = 1024


class Error(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Error, "description": "bad input"},
    403: {"model": Error, "description": "a path outside the scan folder"},
    404: {"model": Error, "description": "no such atlas, feature, graph or file"},
    413: {"model": Error, "description": "request body too large"},
}


class EditIn(BaseModel):
    """One feature to steer."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    feature: int = Field(ge=0, le=MAX_FEATURE)
    mode: Literal["add", "clamp", "ablate"] = "add"
    strength: float = Field(0.0, ge=-MAX_STRENGTH, le=MAX_STRENGTH)
    atlas: str | None = Field(None, max_length=MAX_QUERY_CHARS, description="default: the request's atlas")


class SteerRequest(BaseModel):
    """A prompt and the features to steer it with; both generations share the seed."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    atlas: str | None = Field(None, max_length=MAX_QUERY_CHARS)
    edits: list[EditIn] = Field(min_length=1, max_length=MAX_EDITS)
    positions: Literal["prompt", "generated", "all"] = "all"
    max_new_tokens: int = Field(24, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    seed: int = Field(0, ge=0, le=2**31 - 1)


class SteerResult(BaseModel):
    prompt: str
    unsteered: str
    steered: str
    unsteered_tokens: int
    steered_tokens: int
    positions: str
    max_new_tokens: int
    temperature: float
    seed: int
    seconds: float


class SteerInfo(BaseModel):
    atlas: str
    model: str
    site: str
    n_features: int
    scale: float
    max_new_tokens: int = MAX_NEW_TOKENS


class AtlasInfo(BaseModel):
    id: str
    model: str | None
    site: str | None
    layer: int | None
    n_features: int
    tokens: int | None
    dictionary: str | None
    dictionary_fingerprint: str | None
    dictionary_kind: str | None
    arch: str | None
    created: str | None


class ScanInfo(BaseModel):
    root: str
    kind: str | None
    model: str | None
    created: str | None
    stages: list[str]
    atlases: list[AtlasInfo]
    graphs: int
    audit: bool
    steer_example: bool


class FeatureRow(BaseModel):
    feature: int
    density: float | None
    fired: int | None
    mean_act: float | None
    max_act: float | None
    label: str | None
    score: float | None
    scorer: str | None
    peak_tokens: list[str]
    promoted_tokens: list[str]


class FeaturePage(BaseModel):
    total: int
    offset: int
    limit: int
    features: list[FeatureRow]


class GraphInfo(BaseModel):
    name: str
    slug: str | None
    prompt: str | None
    nodes: int | None
    links: int | None
    readable: bool
    bytes: int


class DictionaryIdentity(BaseModel):
    """The dictionary a graph's feature nodes at one layer come from, as the graph file records it."""

    model_config = ConfigDict(extra="forbid")
    layer: int = Field(ge=0, le=4096)
    fingerprint: str | None = Field(
        None, pattern=r"^[0-9a-f]{8,64}$", description="sha256 of config and weights"
    )
    config: dict[str, Any] | None = Field(None, description="the dictionary's config.json")


class GraphDictionaries(BaseModel):
    """A graph's `metadata.info.dictionary_identity`, one entry per layer."""

    model_config = ConfigDict(extra="forbid")
    dictionaries: list[DictionaryIdentity] = Field(max_length=MAX_LAYERS)


class LayerAtlas(BaseModel):
    layer: int
    atlas: str | None = Field(description="the atlas of exactly this dictionary, or null: no feature pages")


class SteerSample(BaseModel):
    prompt: str
    unsteered: str
    steered: str


class SteerExampleSummary(BaseModel):
    feature: int | None
    mode: str | None
    strength: float | None
    steered_rate: float | None
    unsteered_rate: float | None
    rate_ratio: float | None
    kl: float | None
    perplexity_ratio: float | None
    steered_perplexity: float | None
    unsteered_perplexity: float | None
    passed: bool | None
    n_prompts: int | None
    concept_tokens: list[str]
    examples: list[SteerSample]
    dictionary: str | None
    atlas: str | None
    tried: int | None
    file: str


class SteerExample(BaseModel):
    present: bool
    example: SteerExampleSummary | None = None


class AuditInfo(BaseModel):
    present: bool
    report: dict[str, Any] | None = None
    atlas: str | None = Field(None, description="the atlas of the dictionary the audit read features through")


class Guard:
    """ASGI middleware: refuses request bodies over `max_body` bytes (413) and sets security headers."""

    def __init__(self, app: Any, max_body: int = MAX_BODY_BYTES):
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await self._too_large(send)
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        started = False

        async def with_headers(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                extra = [
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                ]
                names = {k.lower() for k, _ in message.get("headers", [])}
                if b"content-security-policy" not in names:
                    extra.append((b"content-security-policy", CSP.encode()))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self.app(scope, limited, with_headers)
        except BodyTooLarge:
            if not started:
                await self._too_large(send)

    async def _too_large(self, send: Any) -> None:
        body = JSONResponse({"detail": f"request body over {self.max_body} bytes"}, 413).body
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class BodyTooLarge(HTTPException):
    """A request body that went past the limit while it was read (a chunked body has no length to check
    first); raised from `receive`, so FastAPI passes it through as a 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body over {limit} bytes")


def _status(error: MriError) -> int:
    if isinstance(error, OutsideRoot):
        return 403
    if isinstance(error, NotFound):
        return 404
    return 400


def create_app(
    scan_dir: str | Path, *, model: str | None = None, allowed_hosts: list[str] | None = None
) -> FastAPI:
    """The app over `scan_dir` (a scan folder, or a single atlas folder).

    model: the model to steer with, when the scan's manifests name one that cannot be loaded by name.
    allowed_hosts: Host headers answered (default: loopback names only, against DNS rebinding).
    """
    scan = Scan(scan_dir)
    playground = Playground(scan, model)
    indexes: dict[str, FeatureIndex] = {}
    index_lock = threading.Lock()

    def index(atlas: str | None) -> FeatureIndex:
        entry = scan.atlas(atlas)
        with index_lock:
            if entry.id not in indexes:
                indexes[entry.id] = FeatureIndex(entry)
            return indexes[entry.id]

    app = FastAPI(
        title="mri",
        summary="An MRI for AI: browse a scan's features, steer with them, view attribution graphs and audits.",
        version="1",
        docs_url=None,  # Swagger UI and ReDoc come from a CDN: blank under our CSP, and offline
        redoc_url=None,
    )
    app.state.scan = scan
    app.state.index = index

    @app.exception_handler(MriError)
    async def mri_error(request: Request, error: MriError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=_status(error))

    # ---- front end -------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def home() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/index.html", include_in_schema=False)
    def index_html() -> RedirectResponse:
        return RedirectResponse("/")

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> FileResponse:
        path = inside(STATIC, plain_name(name))
        if not path.is_file():
            raise NotFound(f"no static file {name}")
        return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream")

    # ---- scan ------------------------------------------------------------------------------------
    @app.get("/api/scan", response_model=ScanInfo, responses=ERRORS, tags=["scan"])
    def scan_info() -> dict[str, Any]:
        """What the scan holds: model, stages, atlases, number of graphs, whether it has an audit."""
        return scan.summary()

    @app.get("/api/atlases", response_model=list[AtlasInfo], responses=ERRORS, tags=["features"])
    def atlases() -> list[dict[str, Any]]:
        """Every atlas of the scan, by id (its folder relative to the scan)."""
        return [a.summary() for a in scan.atlases.values()]

    # ---- features --------------------------------------------------------------------------------
    @app.get("/api/features", response_model=FeaturePage, responses=ERRORS, tags=["features"])
    def browse(
        atlas: str | None = Query(
            None, max_length=MAX_QUERY_CHARS, description="atlas id; default the first"
        ),
        q: str | None = Query(
            None, max_length=MAX_QUERY_CHARS, description="label text, a token, or a feature number"
        ),
        min_density: float = Query(0.0, ge=0.0, le=1.0, allow_inf_nan=False),
        max_density: float = Query(1.0, ge=0.0, le=1.0, allow_inf_nan=False),
        sort: Literal[SORTS] = Query("density"),  # type: ignore[valid-type]
        order: Literal["asc", "desc"] = Query("desc"),
        offset: int = Query(0, ge=0, le=10**9),
        limit: int = Query(50, ge=1, le=MAX_PAGE),
    ) -> JSONResponse:
        """A page of features matching a search, sorted; `total` counts all matches."""
        page = index(atlas).browse(
            q,
            min_density=min_density,
            max_density=max_density,
            sort=sort,
            descending=order == "desc",
            offset=offset,
            limit=limit,
        )
        return JSONResponse(page)

    @app.get("/api/features/{feature}", responses=ERRORS, tags=["features"])
    def feature_page(
        feature: int = PathParam(ge=0, le=MAX_FEATURE),
        atlas: str | None = Query(None, max_length=MAX_QUERY_CHARS),
    ) -> JSONResponse:
        """One feature's dashboard: statistics, histogram, logit effects, label and scores, co-firing and
        neighbouring features, and its top, quantile-sampled and non-activating examples."""
        return JSONResponse(index(atlas).feature(feature))

    # ---- steering --------------------------------------------------------------------------------
    @app.get("/api/steer", response_model=SteerInfo, responses=ERRORS, tags=["steer"])
    def steer_info(atlas: str | None = Query(None, max_length=MAX_QUERY_CHARS)) -> dict[str, Any]:
        """The model, site, feature count and the site's typical norm (the unit of `add`) for an atlas;
        loads the model on first use."""
        return {**playground.info(atlas), "max_new_tokens": MAX_NEW_TOKENS}

    @app.post("/api/steer", response_model=SteerResult, responses=ERRORS, tags=["steer"])
    def steer(request: SteerRequest) -> dict[str, Any]:
        """Continue the prompt with and without the edits (same seed); greedy when temperature is 0."""
        default = scan.atlas(request.atlas).id
        edits = [Edit(e.atlas or default, e.feature, e.mode, e.strength) for e in request.edits]
        for e in edits:
            index(e.atlas).check(e.feature)
        return playground.generate(
            request.prompt,
            edits,
            positions=request.positions,
            max_new_tokens=request.max_new_tokens,
            temperature=request.temperature,
            seed=request.seed,
        )

    @app.get("/api/steer/example", response_model=SteerExample, responses=ERRORS, tags=["steer"])
    def steer_example() -> JSONResponse:
        """The steering example `mri demo` wrote (steer/concept.json): feature, strength, concept rates,
        perplexity and samples, and the atlas of its dictionary when the scan has one."""
        example = scan.steer_example()
        return JSONResponse(finite({"present": example is not None, "example": example}))

    # ---- graphs ----------------------------------------------------------------------------------
    @app.post("/api/graph-atlases", response_model=list[LayerAtlas], responses=ERRORS, tags=["graphs"])
    def graph_atlases(request: GraphDictionaries) -> list[dict[str, Any]]:
        """For each layer of a graph, the atlas built from the very dictionary the graph was traced with
        (same fingerprint, or same config for atlases without one), or null: a node's feature page must
        describe the node's own latent, not latent i of another dictionary at that layer."""
        out = []
        for d in request.dictionaries:
            entry = scan.atlas_of(d.layer, d.fingerprint, d.config)
            out.append({"layer": d.layer, "atlas": entry.id if entry else None})
        return out

    @app.get("/api/graphs", response_model=list[GraphInfo], responses=ERRORS, tags=["graphs"])
    def graphs() -> list[dict[str, Any]]:
        """The attribution graphs in the scan's graphs/ folder."""
        return scan.graphs()

    @app.get("/api/graphs/{name}", responses=ERRORS, tags=["graphs"])
    def graph(name: str = PathParam(max_length=200)) -> FileResponse:
        """One graph file as written (circuit-tracer / Neuronpedia JSON schema)."""
        return FileResponse(scan.graph_path(name), media_type="application/json")

    # ---- audit -----------------------------------------------------------------------------------
    @app.get("/api/audit", response_model=AuditInfo, responses=ERRORS, tags=["audit"])
    def audit() -> JSONResponse:
        """The audit report (audit/report.json) when the scan has one, and the atlas of the dictionary it
        read features through (whose pages its feature numbers link to) when the scan has that atlas."""
        report = scan.audit_report()
        entry = scan.audit_atlas() if report is not None else None
        return JSONResponse(
            finite({"present": report is not None, "report": report, "atlas": entry.id if entry else None})
        )

    # ---- files -----------------------------------------------------------------------------------
    @app.get("/api/files/{path:path}", responses=ERRORS, tags=["scan"])
    def files(path: str = PathParam(max_length=1000)) -> FileResponse:
        """A file of the scan (JSON, HTML, images, text), resolved inside the scan folder; HTML is served
        sandboxed (no scripts)."""
        target = scan.file(path)
        if target.suffix.lower() not in SERVED_SUFFIXES:
            raise NotFound(f"{path}: only {', '.join(SERVED_SUFFIXES)} files are served")
        return FileResponse(
            target,
            media_type=mimetypes.guess_type(target.name)[0] or "application/octet-stream",
            headers={
                "content-security-policy": "sandbox; default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'"
            },
        )

    def openapi() -> dict[str, Any]:
        """The spec, with the atlas ids of this scan as the values `atlas` may take."""
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            if scan.atlases:
                ids = {"type": "string", "enum": list(scan.atlases)}
                for operation in (op for item in spec["paths"].values() for op in item.values()):
                    for param in operation.get("parameters", []):
                        if param["name"] == "atlas":
                            param["schema"] = {**ids, "title": "Atlas"}
                for name in ("SteerRequest", "EditIn"):
                    spec["components"]["schemas"][name]["properties"]["atlas"]["anyOf"][0] = ids
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    hosts = LOCAL_HOSTS if allowed_hosts is None else allowed_hosts
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)
    app.add_middleware(Guard)
    return app


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on at `host` right now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def serve(
    scan_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8765,
    open_browser: bool = False,
    *,
    model: str | None = None,
    log_level: str = "warning",
) -> None:
    """Serve the app over `scan_dir` until interrupted; print its URL (port 0: any free port).

    Binding another address than loopback exposes the scan and the model to that network: only do it
    on purpose."""
    import uvicorn

    loopback = host in ("127.0.0.1", "localhost", "::1")
    hosts = LOCAL_HOSTS if loopback else ["*"] if host in ("0.0.0.0", "::") else [*LOCAL_HOSTS, host]
    app = create_app(scan_dir, model=model, allowed_hosts=hosts)
    port = port or free_port(host)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    print(f"mri serve: {Path(scan_dir)} at {url} (Ctrl-C stops)", flush=True)
    if open_browser:
        threading.Timer(1.0, webbrowser.open, args=(url,)).start()
    uvicorn.run(app, host=host, port=port, log_level=log_level)
