"""GET /: the playground page, a prompt box and a live map of expert residency.

Plain static files shipped as package data (server/api/static/), no build step and nothing
loaded from outside: deployments often have no internet. The page itself holds no data, so it
is open; what it fetches (/v1/models, /v1/completions, /v1/expert_cache) is behind the API key
and the page asks for the key when the server answers 401.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"
router = APIRouter()


@router.get("/", include_in_schema=False)
async def playground() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def install_playground(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
