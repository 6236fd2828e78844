# syntax=docker/dockerfile:1
# reaper's container image: `docker build -t reaper .` then e.g.
#   docker run --rm -v "$PWD/policies:/etc/reaper/policies:ro" reaper validate
# The entrypoint is `reaper`; the command is its subcommand (default: serve). See deploy/README.md.

# --- build: a virtual environment with reaper and its dependencies (wheels only) ------------------
FROM python:3.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ONLY_BINARY=:all: \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
RUN python -m venv /opt/reaper
COPY pyproject.toml README.md ./
COPY reaper ./reaper
# Binary wheels only (psycopg[binary] included): no compiler is needed, none is installed. The
# project itself is built by setuptools from pyproject.toml, then pip leaves the venv.
RUN /opt/reaper/bin/pip install --no-cache-dir . \
    && /opt/reaper/bin/python -m compileall -q /opt/reaper/lib \
    && /opt/reaper/bin/pip uninstall --yes pip

# --- runtime: the slim base, the venv, an unprivileged user ------------------------------------
FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="reaper" \
      org.opencontainers.image.description="Scheduled retention for task-management APIs, with an audit row per deletion" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 reaper \
    && useradd --system --uid 10001 --gid reaper --home-dir /var/lib/reaper --no-create-home \
       --shell /usr/sbin/nologin reaper \
    && install -d -o reaper -g reaper -m 0700 /var/lib/reaper \
    && install -d -m 0755 /etc/reaper /etc/reaper/policies

COPY --from=build /opt/reaper /opt/reaper

ENV PATH=/opt/reaper/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    REAPER_POLICIES=/etc/reaper/policies \
    REAPER_DATABASE_URL=sqlite:////var/lib/reaper/reaper.db \
    REAPER_LOG_FORMAT=json \
    REAPER_METRICS_HOST=0.0.0.0

# Policies are mounted here (a ConfigMap, or -v ./policies:/etc/reaper/policies:ro); the SQLite
# default lives in /var/lib/reaper (mount a volume to keep it; use PostgreSQL in Kubernetes).
VOLUME ["/var/lib/reaper"]
WORKDIR /var/lib/reaper
USER 10001:10001
EXPOSE 9464

ENTRYPOINT ["reaper"]
CMD ["serve"]
