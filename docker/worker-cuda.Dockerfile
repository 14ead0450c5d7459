# A Celery worker running the engine on an NVIDIA GPU.
#   docker build -f docker/worker-cuda.Dockerfile -t smoothcert-worker-cuda .
#   docker run --gpus all ... smoothcert-worker-cuda
#
# Base: python:3.11-slim rather than nvidia/cuda or pytorch/pytorch. The Linux x86_64 torch
# wheels on PyPI are CUDA builds that bring their own CUDA runtime, cuBLAS and cuDNN as pip
# packages (nvidia-*), so a CUDA base image would only duplicate them; the host needs just
# the NVIDIA driver and the NVIDIA Container Toolkit. To pin a CUDA version that fits an
# older driver, build with e.g. --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SMOOTHCERT_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

WORKDIR /app

ARG TORCH_INDEX_URL=https://pypi.org/simple
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.14" "torchvision>=0.29"

COPY pyproject.toml README.md ./
COPY docker/requirements.py docker/requirements.py
RUN python docker/requirements.py --exclude torch torchvision > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY smoothcert smoothcert
COPY service service
COPY workers workers
COPY clients clients
RUN pip install --no-deps . \
    && useradd --create-home --uid 10001 smoothcert

USER smoothcert
# The CUDA queues only (service/queue.py): CPU jobs stay with CPU workers, and a worker that
# finds no GPU refuses to start (workers/celery_app.py) instead of failing CUDA jobs.
CMD ["celery", "-A", "workers.celery_app", "worker", "--loglevel=INFO", \
     "-Q", "certifications-cuda,predictions-cuda,evaluations-cuda", "--pool=threads", "--concurrency=16"]
