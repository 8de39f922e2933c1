# syntax=docker/dockerfile:1
# emo-serve image: `emo-serve serve` on port 8000, the model mounted at /models.
#
#   GPU (default):  docker build -t emo-serve .
#   CPU variant:    docker build -t emo-serve:cpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
#
# Base choice: a plain Python image plus the torch wheel, not nvidia/cuda or pytorch/pytorch.
# PyPI's Linux torch wheel is the CUDA build and carries its own CUDA runtime, cuBLAS and cuDNN
# as nvidia-* wheels; the container only needs the host's driver, which the NVIDIA Container
# Toolkit (compose `devices: nvidia`, the k8s device plugin) mounts in. An nvidia/cuda runtime
# base would ship a second copy of those libraries (several GB), and pytorch/pytorch images fix
# torch and a conda Python that are not the 3.11 / torch pin the test suite runs. Pointing
# TORCH_INDEX at PyTorch's CPU index gives the CPU variant (about 4 GB smaller) from the same file.
# BASE may be swapped for any image that has python3.11 with venv (e.g. a company-mirrored one).

ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://pypi.org/simple
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /build
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the chosen index, so that `pip install .` finds the requirement satisfied and
# never swaps in a different build; its layer is cached across source changes.
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./src/
COPY server ./src/server
COPY expert_cache ./src/expert_cache
# The runtime install only: no [test] extras, not editable (the source tree stays in this stage).
RUN pip install ./src

FROM ${BASE}
ARG UID=10001
RUN useradd --uid "${UID}" --user-group --create-home --home-dir /home/emo --shell /usr/sbin/nologin emo \
    && mkdir -p /models && chown emo:emo /models
COPY --from=build /opt/venv /opt/venv
# EMO_SERVE_* are read by `emo-serve serve` (server/runtime/settings.py); a flag on the command line
# wins over its variable. The model directory's name becomes the served model name.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    EMO_SERVE_HOST=0.0.0.0 \
    EMO_SERVE_PORT=8000 \
    EMO_SERVE_MODEL=/models/Emo_1b14b_1T \
    EMO_SERVE_DEVICE=auto \
    EMO_SERVE_DRAIN_TIMEOUT=30 \
    EMO_SERVE_LOG_LEVEL=info
USER emo
WORKDIR /home/emo
VOLUME ["/models"]
EXPOSE 8000
# The server binds its port only after the model has loaded, so the start period covers loading
# a large checkpoint from a slow disk; /ready (orchestrators) also goes 503 while draining.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('EMO_SERVE_PORT', '8000') + '/health', timeout=4)"]
# SIGTERM starts the drain: running requests get EMO_SERVE_DRAIN_TIMEOUT seconds, open
# connections 5 s more, then the process exits 0 (give `docker stop -t` at least drain + 10).
STOPSIGNAL SIGTERM
ENTRYPOINT ["emo-serve", "serve"]
CMD []
