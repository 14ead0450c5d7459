# A Celery worker running the engine on the CPU, and (target `flower`) the Flower dashboard.
#   docker build -f docker/worker-cpu.Dockerfile -t smoothcert-worker-cpu .
#   docker build -f docker/worker-cpu.Dockerfile --target flower -t smoothcert-flower .
#
# torch and torchvision come from the PyTorch CPU index: the default PyPI wheels are CUDA
# builds that pull in several GB of NVIDIA libraries a CPU worker never uses. The other
# dependencies come from PyPI, and the project is installed with --no-deps so that pip
# cannot replace the CPU torch with a CUDA one.
FROM python:3.11-slim AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SMOOTHCERT_DEVICE=cpu

WORKDIR /app

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
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


# Flower needs the Celery app (for task names and queues), hence this image plus flower.
FROM runtime AS flower
RUN pip install "flower>=2.0"
USER smoothcert
EXPOSE 5555
CMD ["celery", "-A", "workers.celery_app", "flower", "--port=5555"]


# The default target (last stage): the worker, on the CPU queues only (service/queue.py), its
# jobs as 8 threads of one process; prefetch 1 keeps queued jobs free for other workers.
FROM runtime AS worker
USER smoothcert
CMD ["celery", "-A", "workers.celery_app", "worker", "--loglevel=INFO", \
     "-Q", "certifications,predictions,evaluations", "--pool=threads", "--concurrency=8"]
