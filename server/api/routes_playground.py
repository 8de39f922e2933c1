"""GET /: the playground page, a prompt box and a live map of expert residency.

Plain static files shipped as package data (server/api/static/), no build step and nothing
loaded from outside: deployments often have no internet. The page itself holds no data, so it
is open; what it fetches (/v1/models, /v1/completions, /v1/expert_cache) is behind the API key
and the page asks for the key when the server answers 401.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

STATIC_DIR = Path(__file__).resolve().parent / "static"
# revalidated on every load (a cheap 304 by ETag), so that after an upgrade no browser runs
# yesterday's script against today's API
NO_CACHE = {"Cache-Control": "no-cache"}
router = APIRouter()


class RevalidatedStaticFiles(StaticFiles):
    def file_response(self, full_path: str | os.PathLike[str], stat_result: os.stat_result, scope: Scope,
                      status_code: int = 200) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(NO_CACHE)
        return response


@router.get("/", include_in_schema=False)
async def playground() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers=NO_CACHE)


def install_playground(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/static", RevalidatedStaticFiles(directory=STATIC_DIR), name="static")
