# wasm-sidecar: a JSON-RPC 2.0 daemon on stdin/stdout. Run it with `docker run -i --rm IMAGE`
# (stdin must stay open: end of input is how a host tells the sidecar to stop).
FROM python:3.11-slim

# Unbuffered, no .pyc litter, and pip without a cache keep the image small and logs prompt.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin sidecar

WORKDIR /opt/wasm-sidecar
COPY pyproject.toml README.md ./
COPY config ./config
COPY protocol ./protocol
COPY sidecar ./sidecar
RUN pip install . && rm -rf /opt/wasm-sidecar/build

USER 10001
# The compile cache lives in the user's cache dir; mount a volume here to keep it across runs.
ENV SIDECAR_CACHE_DIR=/home/sidecar/.cache/wasm-sidecar

# The daemon installs its own SIGTERM/SIGINT handlers, so it stops cleanly as PID 1
# (the kernel gives PID 1 no default signal actions). Exec form: no shell in between.
ENTRYPOINT ["wasm-sidecar"]
