"""The image's install, without Docker: the build context the .dockerignore lets through, the
files the Dockerfile copies, a fresh virtual environment (no system site-packages), torch at
the Dockerfile's pin, then `pip install` of the copy without extras. The installed `emo-serve
serve` must come up with the image's settings, answer (the playground page too), and exit 0 on
SIGTERM."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.deploy.conftest import LOOPBACK, ROOT, clean_env, free_port, stop, wait_ready
from tests.deploy.dockerfile import DockerIgnore, env_of, parse_dockerfile, stages
from tests.deploy.test_dockerfile import context_files, dockerfile_pip_steps

INSTRUCTIONS = parse_dockerfile(ROOT / "Dockerfile")


def dockerfile_arg(name: str) -> str:
    return next(ins.args.split("=", 1)[1] for ins in INSTRUCTIONS
                if ins.keyword == "ARG" and ins.args.startswith(name + "="))


def copy_like_the_build_stage(dest: Path) -> Path:
    """What `COPY <src>... ./src/` puts in the build stage, taken from the filtered context."""
    ignore = DockerIgnore.read(ROOT / ".dockerignore")
    context = [p for p in context_files() if not ignore.excluded(p)]
    src = dest / "src"
    build = stages(INSTRUCTIONS)[0]
    for ins in build:
        if ins.keyword != "COPY":
            continue
        *sources, target = ins.args.split()
        assert target.startswith("./src"), f"Dockerfile line {ins.line}: copies outside ./src"
        for source in sources:
            picked = [p for p in context if p == source or p.startswith(source + "/")]
            assert picked, f"Dockerfile line {ins.line}: {source} is not in the build context"
            tdir = target.removeprefix("./src").strip("/")
            for path in picked:  # a file lands in (or as) the target; a folder's content goes into it
                if path == source:
                    rel = f"{tdir}/{Path(path).name}" if target.endswith("/") else tdir
                else:
                    rel = f"{tdir}/{path[len(source) + 1:]}"
                out = src / rel.strip("/")
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / path, out)
    return src


def isolated_env(**extra: str) -> dict[str, str]:
    """As in the container: no EMO_SERVE_* and no PYTHONPATH leaking the checkout in."""
    env = clean_env(**extra)
    env.pop("PYTHONPATH", None)
    return env


def run(cmd: list[str], cwd: Path, timeout: float) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=isolated_env())
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.mark.slow
def test_fresh_install_serves_and_drains(tmp_path: Path, tiny_emo_checkpoint: Path) -> None:
    assert dockerfile_pip_steps() == ["torch==${TORCH_VERSION}", "./src"]
    copy_like_the_build_stage(tmp_path)
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], tmp_path, 120)
    # --no-compile: bytecode only speeds up imports; what gets installed is the same.
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-compile"]
    run([*pip, f"torch=={dockerfile_arg('TORCH_VERSION')}"], tmp_path, 600)
    run([*pip, "./src"], tmp_path, 600)

    # The installed package, not the checkout: nothing of /work/main is on the path.
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import server; print(server.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, env=isolated_env(), timeout=60)
    assert where.returncode == 0 and Path(where.stdout.strip()).is_relative_to(venv), where

    port = free_port()
    image_env = {k: v for k, v in env_of(stages(INSTRUCTIONS)[-1]).items() if k.startswith("EMO_SERVE_")}
    env = isolated_env(**{**image_env, "EMO_SERVE_HOST": LOOPBACK, "EMO_SERVE_PORT": str(port),
                          "EMO_SERVE_MODEL": str(tiny_emo_checkpoint), "EMO_SERVE_DRAIN_TIMEOUT": "2",
                          "EMO_SERVE_MAX_MODEL_LEN": "256"})
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(venv / "bin" / "emo-serve"), "serve"], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://{LOOPBACK}:{port}"
        wait_ready(proc, url, log)
        name = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        reply = httpx.post(url + "/v1/completions", timeout=60,
                           json={"model": name, "prompt": "hello", "max_tokens": 2})
        assert reply.status_code == 200, reply.text
        page = httpx.get(url + "/", timeout=10)  # the playground's files came as package data
        assert page.status_code == 200 and "static/app.js" in page.text, page.text[:300]
        for asset in ("static/app.js", "static/style.css", "static/favicon.svg"):
            assert httpx.get(f"{url}/{asset}", timeout=10).status_code == 200, asset
    finally:
        code = stop(proc)
    assert code == 0, f"exit code {code} after SIGTERM:\n{log.read_text()[-4000:]}"
