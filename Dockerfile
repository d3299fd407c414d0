# The gateway image: `docker build -t triton-fleet-gateway .`
# It runs `python -m gateway serve` with the config mounted at /etc/gateway/gateway.toml
# (docker-compose.yml mounts configs/compose.toml there).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Only what `pip install .` needs (packages gateway* and training*). README.md is optional
# (the wildcard lets the build go on without it).
COPY pyproject.toml README.md* ./
COPY gateway ./gateway
COPY training ./training

# torch==2.13.0 is a project dependency (the training code and the models use it; the gateway
# itself never runs a model). From PyPI, Linux x86_64 torch is the CUDA build and pulls several
# GB of nvidia-* wheels; the CPU index has the same version as 2.13.0+cpu (which satisfies
# ==2.13.0) at a fraction of the size. PyPI stays the main index for everything else.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu . \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin gateway

USER gateway

EXPOSE 8000

# The slim image has no curl: ask the liveness endpoint with Python's standard library.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/live', timeout=2)"]

CMD ["python", "-m", "gateway", "serve", "--config", "/etc/gateway/gateway.toml", "--host", "0.0.0.0"]
