# kiban ingest worker (also runs the beat schedule): the common library + the "ingest" extra.
# Build from the repository root:  docker build -f docker/ingest.Dockerfile -t kiban/ingest .
# Only shared/ and services/ingest/ are copied; setuptools skips the other `where` roots of
# pyproject.toml that are absent (see docker/README.md).

FROM python:3.11.13-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared/ shared/
COPY services/ingest/ services/ingest/
# The project itself (a path, not a registry name): DL3013 pinning does not apply.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[ingest]"

FROM python:3.11.13-slim-bookworm
LABEL org.opencontainers.image.title="kiban-ingest" \
      org.opencontainers.image.description="kiban ingest worker and beat schedule"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    HOME=/tmp KIBAN_HOME=/var/lib/kiban
RUN groupadd --system --gid 10001 kiban \
    && useradd --system --uid 10001 --gid kiban --no-create-home --shell /usr/sbin/nologin kiban \
    && mkdir -p /var/lib/kiban && chown kiban:kiban /var/lib/kiban
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /var/lib/kiban
EXPOSE 9100
# Health: Kubernetes probes GET :9100/metrics (charts/kiban); no HEALTHCHECK here.
ENTRYPOINT ["python", "-m", "kiban.worker"]
CMD ["ingest"]
