# kiban ingest worker: the common library plus the "ingest" extra only.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared/ shared/
COPY services/ingest/ services/ingest/
RUN pip install --no-cache-dir ".[ingest]"
RUN useradd --create-home --uid 10001 kiban
USER kiban
EXPOSE 9100
ENTRYPOINT ["kiban"]
CMD ["worker", "ingest"]
