# kiban encoder worker (and index writer): the common library + the "encoder" extra
# (onnxruntime-gpu, Pillow; no torch). Two targets from one file:
#
#   docker build -f docker/encoder.Dockerfile --target cpu -t kiban/encoder-cpu .   # indexer, CPU pools
#   docker build -f docker/encoder.Dockerfile -t kiban/encoder .                    # GPU pools (default)
#
# GPU choice: python:3.11-slim plus the CUDA and cuDNN libraries that onnxruntime-gpu itself
# declares as pip extras (onnxruntime-gpu[cuda,cudnn]), instead of an nvidia/cuda base image:
# same base and Python as the other images, and the CUDA/cuDNN versions always match the ones
# this onnxruntime-gpu was built against (a mismatch makes ORT fall back to CPU silently).
# The host needs only the NVIDIA driver (new enough for that CUDA major) and the device plugin.
# ORT_VERSION must be the onnxruntime-gpu version the "encoder" extra resolves to.

ARG ORT_VERSION=1.31.1

FROM python:3.11.13-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared/ shared/
COPY services/encoder/ services/encoder/
# The project itself (a path, not a registry name): DL3013 pinning does not apply.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[encoder]"

FROM build AS build-gpu
ARG ORT_VERSION
RUN pip install --no-cache-dir "onnxruntime-gpu[cuda,cudnn]==${ORT_VERSION}"

FROM python:3.11.13-slim-bookworm AS cpu
LABEL org.opencontainers.image.title="kiban-encoder-cpu" \
      org.opencontainers.image.description="kiban encoder and index worker, CPU execution provider"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    HOME=/tmp KIBAN_HOME=/var/lib/kiban \
    KIBAN_ORT_PROVIDERS=CPUExecutionProvider
RUN groupadd --system --gid 10001 kiban \
    && useradd --system --uid 10001 --gid kiban --no-create-home --shell /usr/sbin/nologin kiban \
    && mkdir -p /var/lib/kiban && chown kiban:kiban /var/lib/kiban
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /var/lib/kiban
EXPOSE 9100
# Health: Kubernetes probes GET :9100/metrics (charts/kiban); no HEALTHCHECK here.
ENTRYPOINT ["python", "-m", "kiban.worker"]
CMD ["encoder"]

FROM python:3.11.13-slim-bookworm AS gpu
LABEL org.opencontainers.image.title="kiban-encoder" \
      org.opencontainers.image.description="kiban encoder worker, CUDA execution provider"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    HOME=/tmp KIBAN_HOME=/var/lib/kiban \
    KIBAN_ORT_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN groupadd --system --gid 10001 kiban \
    && useradd --system --uid 10001 --gid kiban --no-create-home --shell /usr/sbin/nologin kiban \
    && mkdir -p /var/lib/kiban && chown kiban:kiban /var/lib/kiban
COPY --from=build-gpu /opt/venv /opt/venv
# Let the dynamic loader find the pip-installed CUDA/cuDNN libraries (site-packages/nvidia/*/lib)
# without code changes (the alternative is onnxruntime.preload_dlls() in the worker).
RUN find /opt/venv/lib/python3.11/site-packages/nvidia -type d -name lib > /etc/ld.so.conf.d/nvidia-pip.conf \
    && ldconfig
USER 10001:10001
WORKDIR /var/lib/kiban
EXPOSE 9100
# Health: Kubernetes probes GET :9100/metrics (charts/kiban); no HEALTHCHECK here.
ENTRYPOINT ["python", "-m", "kiban.worker"]
CMD ["encoder"]
