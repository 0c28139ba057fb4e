"""The web app: one page (static HTML + JS) and a JSON API, on FastAPI.

Routes:
- `GET /`: the page (upload photos, type a name, one button).
- `GET /api/info`: the index, the model, the limits, the guardrails, the reference population.
- `GET /api/health`: alive, and how many requests wait for the model.
- `POST /api/attack`: multipart form, `name` (text) and `photos` (1..max files): the answer (`answer.py`).
- `GET /docs`, `GET /openapi.json`: the API, documented by FastAPI.

Every bad request gets a 4xx with `{"error": "<one line>"}` and the server goes on serving; an unexpected
failure is a 500 with one line (its traceback goes to the server's log, never to the client).
"""

from __future__ import annotations

import logging
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import IdiaError, InputError
from .answer import GUARDRAILS, answer_json
from .keep import keep_request
from .photos import decode_uploads
from .reference import ReferencePopulation
from .scorer import IndexScorer
from .settings import ServeSettings
from .upload import RequestError, parse_form, read_body

log = logging.getLogger(__name__)

_ATTACK_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["name", "photos"],
        "properties": {
            "name": {"type": "string", "description": "The person's full name (1..256 characters, one line)."},
            "photos": {"type": "array", "items": {"type": "string", "format": "binary"},
                       "description": "1..max_photos photos of the person (JPEG, PNG, WebP, ...)."},
        }}}},
}


def create_app(settings: ServeSettings, scorer: IndexScorer, reference: ReferencePopulation | None = None
               ) -> FastAPI:
    app = FastAPI(title="idia-engine", version="1", summary="Does this CLIP model know this face's name?",
                  description="Identity Inference Attack over one built name index. " + " ".join(GUARDRAILS))
    page = resources.files(__package__).joinpath("static", "index.html").read_text(encoding="utf-8")

    @app.exception_handler(RequestError)
    async def _bad_request(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": f"{exc.detail} ({request.method} {request.url.path})"},
                            status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        return JSONResponse({"error": f"{'.'.join(map(str, first.get('loc', ())))}: {first.get('msg', 'invalid')}"},
                            status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("serve: %s %s failed", request.method, request.url.path)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server keeps serving, "
                                      "its log has the details"}, status_code=500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/api/health")
    async def health() -> dict:
        """Alive; `waiting`: requests waiting for the model or using it now."""
        return {"status": "ok", "waiting": scorer.waiting}

    @app.get("/api/info")
    async def info() -> dict:
        """What this server answers over, and its limits and guardrails."""
        return server_info(settings, scorer, reference)

    @app.post("/api/attack", openapi_extra={"requestBody": _ATTACK_BODY})
    async def attack(request: Request) -> JSONResponse:
        """Score the typed name against the uploaded photos (paper mode, exactly as `query` would), with the
        continuous scores and, given a reference report, where the score falls among its people."""
        body = await read_body(request.stream(), request.headers.get("content-length"), settings.max_upload_bytes)
        form = parse_form(body, request.headers.get("content-type"), settings.max_photos)
        del body
        name = form.fields.get("name")
        if name is None or not name.strip():
            raise RequestError(422, "no name: type the person's full name")
        files = [f for f in form.files if f.filename or f.data]  # a browser sends an empty part for no file
        if not files:
            raise RequestError(422, "no photo: choose 1 to {} photos of the person".format(settings.max_photos))
        try:
            scorer.typed_name(name)  # the name's checks, before any photo is decoded
            photos, duplicates = await run_in_threadpool(decode_uploads, files, settings.max_pixels)
            result = await run_in_threadpool(scorer.score, name, photos)
        except InputError as e:
            raise RequestError(422, str(e)) from None
        except IdiaError as e:
            raise RequestError(500, str(e)) from None
        answer = answer_json(result, scorer, duplicates, reference, settings.auditor)
        if settings.keep_dir is not None:
            kept = await run_in_threadpool(keep_request, settings.keep_dir, files, answer)
            answer["kept_in"] = kept.name
        return JSONResponse(answer)

    return app


def server_info(settings: ServeSettings, scorer: IndexScorer, reference: ReferencePopulation | None) -> dict:
    manifest = scorer.index.manifest
    return {
        "index": {"names": len(scorer.index.names), "templates": len(scorer.templates),
                  "kind": manifest.index_kind, "exact": True, "held_in_memory": scorer.resident},
        "model": {"model": _shown(manifest.model_info.model), "pretrained": _shown(manifest.model_info.pretrained),
                  "fingerprint": manifest.model_info.fingerprint[:12], "device": str(scorer.model.device),
                  "precision": scorer.model.precision.value},
        "tau": settings.tau,
        "limits": {"max_photos": settings.max_photos, "max_upload_mb": settings.max_upload_mb,
                   "max_pixels": settings.max_pixels, "max_name_characters": 256},
        "auditor": settings.auditor, "keeps_photos": settings.keep_dir is not None,
        "guardrails": GUARDRAILS,
        "reference": None if reference is None else {
            "report": reference.report_dir.name, "members": reference.n_members,
            "non_members": reference.n_non_members},
    }


def _shown(spec: str | None) -> str | None:
    """A model or weights spec as the page shows it: a local file by its name (the server's folders are its own)."""
    if spec and ("/" in spec or "\\" in spec) and not spec.startswith("hf-hub:"):
        return spec.replace("\\", "/").rsplit("/", 1)[-1]
    return spec
