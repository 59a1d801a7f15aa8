# syntax=docker/dockerfile:1
# One image for every propeller-fl service (compose.yaml picks the service with
# `command: ["serve", "<service>"]`) and for the CLI. See docs/compose.md.

# --- the project installed into a virtualenv ----------------------------------------------
FROM python:3.11-slim AS install
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY server ./server
COPY proplet ./proplet
RUN --mount=type=cache,target=/root/.cache/pip pip install .

# --- the WASM training client, built with Zig from the ziglang wheel ------------------------
FROM install AS wasm
COPY wasm-client ./wasm-client
RUN python wasm-client/build.py

# --- runtime ---------------------------------------------------------------------------------
FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=install /opt/venv /opt/venv
COPY --from=wasm /app/wasm-client/build/fl-client.wasm /app/wasm-client/build/fl-client.wasm
# State lives under /var/lib/propeller and certificates under /certs (named volumes in
# compose.yaml); the directories exist in the image so a fresh volume starts out owned by the
# unprivileged user.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/propeller propeller \
    && mkdir -p /var/lib/propeller/registry /var/lib/propeller/proplet /certs \
    && chown -R propeller:propeller /var/lib/propeller /certs
USER propeller
WORKDIR /app
ENTRYPOINT ["propeller-fl"]
CMD ["--help"]
