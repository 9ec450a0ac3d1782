"""The Mining view's web app (FastAPI, no Airflow imports): mining.ui behind three routes.

Airflow mounts it under /mining (see plugins/mining_plugin.py); tests and the browser tier
can also serve it alone with uvicorn. Settings are read from the environment per request,
so the API server sees the same MINING_HOME as the tasks.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, Response

from mining import ui
from mining.settings import Settings, load_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app; ``settings`` pins a configuration (tests), else the environment is read per request."""
    app = FastAPI(title="Mining", docs_url=None, redoc_url=None, openapi_url=None)

    def current() -> Settings:
        return settings if settings is not None else load_settings()

    @app.get("/", response_class=HTMLResponse)
    def page(request: Request) -> HTMLResponse:
        data = ui.load_page(current(), ui.Filters.from_query(request.query_params))
        code = 503 if data.status == "busy" else 200
        headers = {"Cache-Control": "no-store"}
        if data.status == "busy":
            headers["Retry-After"] = "5"
        return HTMLResponse(ui.render_page(data), status_code=code, headers=headers)

    @app.get("/thumb/{name}")
    def thumb(name: str) -> Response:
        body = ui.thumbnail(current(), name.removesuffix(".jpg"))
        if body is None:
            return Response("not found", status_code=404, media_type="text/plain")
        # content addressed: a sha256 never changes its bytes
        return Response(body, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=31536000, immutable"})

    @app.get("/report/{week}")
    def report(week: str) -> Response:
        path = ui.report_path(current(), week)
        if path is None:
            return Response("no such report", status_code=404, media_type="text/plain")
        return FileResponse(path, media_type="text/html")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


