"""Stepwise's web page: the static folder, mounted on any FastAPI app in one line.

    from serve.page import mount_page
    mount_page(app)   # GET / → index.html, GET /static/* → serve/static/

The page is plain HTML, CSS and JS (no build step, nothing from a CDN). It only talks to the server over HTTP:
``GET stepwise/v1/models``, ``POST sdapi/v1/txt2img`` / ``sdapi/v1/img2img``, ``GET sdapi/v1/progress`` and
``POST sdapi/v1/interrupt``, all by relative URL, so it also works behind a path prefix. Nothing here imports the
rest of the server.
"""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"


def mount_page(app, path: str = "/static") -> None:
    """Serve ``serve/static`` at ``path`` and ``index.html`` at ``GET /``.

    The page asks for its script and style sheet at ``static/…`` relative to itself, so keep ``path`` at its
    default unless the page moves with it.
    """
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    index = STATIC_DIR / "index.html"

    def page() -> FileResponse:
        # no-cache: a browser revalidates the page after an upgrade instead of keeping an old copy
        return FileResponse(index, media_type="text/html", headers={"Cache-Control": "no-cache"})

    app.add_api_route("/", page, methods=["GET"], include_in_schema=False, name="stepwise-page")
    app.mount(path, StaticFiles(directory=STATIC_DIR), name="stepwise-static")
