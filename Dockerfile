# syntax=docker/dockerfile:1
# worker-orcd for NVIDIA GPUs. Two stages:
#   builder  - wheels of worker-orcd and every dependency; PyCUDA is published as source only
#              and is compiled here against this image's CUDA toolkit;
#   runtime  - those wheels in a virtual environment, nothing else from the build.
# The runtime keeps nvcc and a host compiler: the worker compiles its kernels (shipped in the
# wheel) at start-up and caches them in /var/cache/worker-orcd (mount a volume there).
#
#   docker build -t worker-orcd .
#   docker run --gpus all -v /models:/models:ro worker-orcd serve --model /models/m.gguf \
#       --nats-url nats://nats-host:4222
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-devel-ubuntu24.04

FROM ${CUDA_IMAGE} AS builder
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev python3-venv g++ \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /build && /build/bin/pip install --no-cache-dir --upgrade pip
WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY worker ./worker
COPY actors ./actors
COPY cuda_src ./cuda_src
# libcuda comes from the host's driver at run time; PyCUDA links against the toolkit's stub
ENV LIBRARY_PATH=/usr/local/cuda/lib64/stubs
RUN /build/bin/pip wheel --no-cache-dir --wheel-dir /wheels '.[cuda]'

FROM ${CUDA_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv g++ \
    && rm -rf /var/lib/apt/lists/*
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python3 -m venv /opt/worker-orcd \
    && /opt/worker-orcd/bin/pip install --no-cache-dir --no-index --find-links /wheels \
        'worker-orcd[cuda]'
RUN useradd --system --create-home --home-dir /home/orcd orcd \
    && mkdir -p /var/cache/worker-orcd /var/lock/worker-orcd \
    && chown orcd /var/cache/worker-orcd /var/lock/worker-orcd
USER orcd
ENV PATH=/opt/worker-orcd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    WORKER_ORCD_CACHE=/var/cache/worker-orcd \
    WORKER_ORCD_GPU_LOCK_DIR=/var/lock/worker-orcd
VOLUME ["/var/cache/worker-orcd"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["worker-orcd"]
CMD ["serve", "--help"]
