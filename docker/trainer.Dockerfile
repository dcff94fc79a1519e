# kiban trainer worker (queue train): trains domain specialists from labelled batches and
# publishes them to the model registry. The common library + the "trainer" extra: torch,
# torchvision, timm, open_clip, pytorch-metric-learning, onnx, onnx-tool and onnxruntime (the
# parity check of the exported graph, always on the CPU execution provider).
# Build from the repository root:  docker build -f docker/trainer.Dockerfile -t kiban/trainer .
#
# One image for CPU and GPU nodes: the torch wheel from PyPI (linux x86_64) carries its CUDA
# libraries as pip dependencies (nvidia-* wheels) and falls back to the CPU when no GPU is
# visible. `kiban train --mode head` trains on the CPU either way (seconds); `--mode finetune`
# uses the GPU when the pod has one (charts/kiban: trainer.gpu). The versions are the ones the
# "export" extra pins. services/trainer/ holds the trainer and the export tool it builds on.

FROM python:3.11.13-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared/ shared/
COPY services/trainer/ services/trainer/
# The project itself (a path, not a registry name): DL3013 pinning does not apply.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[trainer]"

FROM python:3.11.13-slim-bookworm
LABEL org.opencontainers.image.title="kiban-trainer" \
      org.opencontainers.image.description="kiban trainer worker: domain specialists from labelled batches"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    HOME=/tmp KIBAN_HOME=/var/lib/kiban \
    KIBAN_ORT_PROVIDERS=CPUExecutionProvider \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN groupadd --system --gid 10001 kiban \
    && useradd --system --uid 10001 --gid kiban --no-create-home --shell /usr/sbin/nologin kiban \
    && mkdir -p /var/lib/kiban && chown kiban:kiban /var/lib/kiban
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /var/lib/kiban
EXPOSE 9100
# Health: Kubernetes probes GET :9100/metrics (charts/kiban); no HEALTHCHECK here.
ENTRYPOINT ["python", "-m", "kiban.worker"]
CMD ["trainer"]
