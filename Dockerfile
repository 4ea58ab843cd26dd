# dsf-bridge in a container: the seat of the DSF BPE next to a DSF FHIR server.
#   docker build -t dsf-bridge .
#   docker run -v ./conf:/etc/dsf-bridge:ro -v dsf-bridge-data:/var/lib/dsf-bridge dsf-bridge
# deploy/compose.yaml places it next to a DSF FHIR server; docs/operations.md explains it all.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md alembic.ini ./
COPY dsf_bridge ./dsf_bridge
COPY migrations ./migrations
COPY bpmn ./bpmn
COPY profiles ./profiles
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
# A system user with a fixed uid (volumes and secrets can be owned by it), no login shell.
RUN groupadd --system --gid 10001 dsf-bridge \
    && useradd --system --uid 10001 --gid dsf-bridge --no-create-home \
       --home-dir /var/lib/dsf-bridge --shell /usr/sbin/nologin dsf-bridge \
    && mkdir -p /etc/dsf-bridge /var/lib/dsf-bridge /opt/dsf-bridge/plugins \
    && chown dsf-bridge:dsf-bridge /var/lib/dsf-bridge
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY deploy/healthcheck.py /usr/local/lib/dsf-bridge/healthcheck.py

# The configuration (bridge.toml; certificates and keys may sit beside it), the data directory
# (the SQLite store, when not on PostgreSQL) and the drop-in plugins folder.
VOLUME ["/etc/dsf-bridge", "/var/lib/dsf-bridge", "/opt/dsf-bridge/plugins"]

# Defaults an operator overrides with DSF_BRIDGE_* variables (docs/configuration.md); secrets
# come as files: DSF_BRIDGE_DB__PASSWORD_FILE=/run/secrets/..., DSF_BRIDGE_API__TOKEN_FILE=...
ENV DSF_BRIDGE_CONFIG=/etc/dsf-bridge/bridge.toml \
    DSF_BRIDGE_DB__URL=sqlite:////var/lib/dsf-bridge/bridge.db \
    DSF_BRIDGE_API__ENABLED=true \
    DSF_BRIDGE_API__HOST=0.0.0.0 \
    DSF_BRIDGE_API__PORT=8480 \
    DSF_BRIDGE_LOG__FORMAT=json \
    DSF_BRIDGE_PLUGINS__FOLDER=/opt/dsf-bridge/plugins \
    PYTHONUNBUFFERED=1

USER dsf-bridge
WORKDIR /var/lib/dsf-bridge
EXPOSE 8480
# /ready: the store answers, the websocket subscriptions are bound (or down for less than
# api.disconnected_after), the workers run. The start period covers certificate checks,
# plugin publication and the first catch-up.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "/usr/local/lib/dsf-bridge/healthcheck.py"]
ENTRYPOINT ["dsf-bridge"]
# `--upgrade-db` migrates the schema at start-up; drop it to run `dsf-bridge db upgrade` yourself.
CMD ["run", "--upgrade-db"]
