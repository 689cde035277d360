# edged on the CPU (ONNX Runtime). For an NVIDIA box, build FROM an NVIDIA CUDA/TensorRT runtime image
# and install with the `gpu` extra: pip install '.[gpu]'.
FROM python:3.11-slim-bookworm

RUN useradd --system --home-dir /var/lib/edged --shell /usr/sbin/nologin edged \
 && mkdir -p /var/lib/edged && chown edged:edged /var/lib/edged

WORKDIR /opt/edged
COPY pyproject.toml README.md ./
COPY edged ./edged
COPY engines ./engines
RUN pip install --no-cache-dir . && rm -rf /root/.cache

USER edged
ENV STATE_DIRECTORY=/var/lib/edged \
    PYTHONUNBUFFERED=1
VOLUME ["/var/lib/edged"]
# DICOM listener; metrics and health.
EXPOSE 11112 8780
STOPSIGNAL SIGTERM
ENTRYPOINT ["edged"]
CMD ["serve"]
