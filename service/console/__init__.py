"""The web console at `/` and the API page at `/docs`, both static and offline.

Every asset is a file: the console's HTML, CSS and JavaScript modules in `static/` (package
data, no build step), Swagger UI's from the `fastapi-offline` package, and the example
images from the repository's `examples/` folder, read when asked for. Nothing is loaded from
another origin, so both pages work with no network.

Their responses carry a Content-Security-Policy that allows scripts, styles and connections
from this origin only, and no inline script or style: a string the console shows (a model
name, a label, an error message) is inserted as text, and could not run even if it were
not. The console is harmless without a key: it only calls the HTTP API, with the key the
user typed (kept in the tab's sessionStorage, never in a URL or localStorage).
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import fastapi_offline
import numpy as np
from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import NotFound

STATIC = Path(__file__).resolve().parent / "static"
SWAGGER_STATIC = Path(fastapi_offline.__file__).resolve().parent / "static"
# The repository's examples (`examples/digit-<class>.png`); absent where only the package is
# installed, and then the console offers uploads alone.
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
_EXAMPLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\.(png|jpg|jpeg|npy)")
_MEDIA = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "npy": "application/octet-stream"}
_DIGIT = re.compile(r"digit-([0-9])\.png")

CSP = "; ".join([
    "default-src 'none'", "script-src 'self'", "style-src 'self'", "img-src 'self' data: blob:",
    "connect-src 'self'", "font-src 'self'", "frame-ancestors 'none'", "base-uri 'none'", "form-action 'self'",
])
HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
           (b"referrer-policy", b"no-referrer"), (b"cache-control", b"no-cache")]

# The API page: Swagger UI from local files, started by a script file (no inline script).
DOCS_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>smoothcert API</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="docs/assets/swagger-ui.css">
<script src="docs/assets/swagger-ui-bundle.js" defer></script>
<script src="console/assets/docs.js" defer></script>
</head>
<body>
<div id="swagger-ui" data-openapi="openapi.json"></div>
</body>
</html>
"""


def is_page(path: str) -> bool:
    """The console's and the API page's paths: those that get the security headers."""
    return path == "/" or path.startswith(("/console/", "/docs/")) or path in ("/console", "/docs")


class SecurityHeaders:
    """Adds the CSP, `nosniff`, `no-referrer` and `no-cache` to every answer on a page path
    (errors included); the JSON API's answers are left as they are."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_page(scope["path"]):
            return await self.app(scope, receive, send)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS:
                    headers[name.decode()] = value.decode()
            await send(message)

        await self.app(scope, receive, send_with_headers)


def example_names() -> list[str]:
    if not EXAMPLES.is_dir():
        return []
    return sorted(p.name for p in EXAMPLES.iterdir() if p.is_file() and _EXAMPLE_NAME.fullmatch(p.name))


def digits_dataset() -> bytes:
    """The example digits as an evaluation data set: an .npz of `x` uint8 [N, H, W] (the
    greyscale PNGs as they are) and `y`, each file's class from its name."""
    files = [(int(m.group(1)), EXAMPLES / name) for name in example_names() if (m := _DIGIT.fullmatch(name))]
    if not files:
        raise NotFound("this installation has no example digits (the repository's examples/ folder)")
    x = np.stack([np.asarray(Image.open(path).convert("L"), dtype=np.uint8) for _, path in files])
    out = io.BytesIO()
    np.savez(out, x=x, y=np.array([label for label, _ in files], dtype=np.int64))
    return out.getvalue()


router = APIRouter(include_in_schema=False)


@router.get("/", response_class=FileResponse)
async def console_page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")


@router.get("/docs", response_class=HTMLResponse)
async def api_page() -> HTMLResponse:
    return HTMLResponse(DOCS_HTML)


@router.get("/console/examples")
async def list_examples() -> JSONResponse:
    """The example inputs' names (`digit-7.png`, …), for `/console/examples/{name}`."""
    return JSONResponse({"examples": await run_in_threadpool(example_names)})


@router.get("/console/examples/digits.npz")
async def example_dataset() -> Response:
    return Response(await run_in_threadpool(digits_dataset), media_type="application/octet-stream")


@router.get("/console/examples/{name}")
async def example(name: str) -> FileResponse:
    # Only a listed file name: no path separator or dot-dot can reach past the folder.
    if not _EXAMPLE_NAME.fullmatch(name) or name not in await run_in_threadpool(example_names):
        raise NotFound(f"no example named {name!r} (GET /console/examples lists them)")
    return FileResponse(EXAMPLES / name, media_type=_MEDIA[name.rsplit(".", 1)[1]])


def install(app: FastAPI) -> None:
    """The console's and the API page's routes, assets and headers (create_app calls it)."""
    app.include_router(router)
    app.mount("/console/assets", StaticFiles(directory=STATIC), name="console-assets")
    app.mount("/docs/assets", StaticFiles(directory=SWAGGER_STATIC), name="docs-assets")
    app.add_middleware(SecurityHeaders)
