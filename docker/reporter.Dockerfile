# kiban reporter worker: the common library plus the "reporter" extra only.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared/ shared/
COPY services/reporter/ services/reporter/
RUN pip install --no-cache-dir ".[reporter]"
RUN useradd --create-home --uid 10001 kiban
USER kiban
EXPOSE 9100
ENTRYPOINT ["kiban"]
CMD ["worker", "reporter"]
