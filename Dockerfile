# edged on NVIDIA's TensorRT image (TensorRT, CUDA with nvcc for pycuda). Build and run:
#   docker build -t edged .
#   docker run --gpus all -p 11112:11112 -p 8780:8780 -v edged-state:/var/lib/edged edged
# Engines (TensorRT plans) are built at first start into the state volume, or ahead of time with
#   docker run --gpus all -v edged-state:/var/lib/edged edged engines build
# A CPU-only image: --build-arg BASE=python:3.11-slim-bookworm --build-arg EXTRAS= (ONNX Runtime).
ARG BASE=nvcr.io/nvidia/tensorrt:25.01-py3
FROM ${BASE}

ARG EXTRAS=gpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    EDGED_CONFIG=/etc/edged/edged.toml

RUN useradd --system --home-dir /var/lib/edged --shell /usr/sbin/nologin edged \
 && mkdir -p /var/lib/edged /etc/edged \
 && chown edged:edged /var/lib/edged

WORKDIR /opt/edged
COPY pyproject.toml README.md ./
COPY edged ./edged
COPY engines ./engines
COPY ops/docker/edged.toml /etc/edged/edged.toml
RUN python3 -m pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}"

USER edged
VOLUME ["/var/lib/edged"]
# DICOM listener; metrics and health.
EXPOSE 11112 8780
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8780/healthz', timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["edged"]
CMD ["serve"]
