# The HTTP API: FastAPI under uvicorn. Build from the repository root:
#   docker build -f docker/api.Dockerfile -t smoothcert-api .
#
# No torch here. The API never imports torch (tests/test_layering.py holds that line), but
# the one `smoothcert` distribution declares torch for the engine and the workers. So the
# image installs every declared dependency except torch, torchvision, scikit-learn and
# matplotlib (the engine's training and plotting needs), then the project with --no-deps.
# That saves ~1-5 GB (CPU/CUDA torch) and keeps the API start fast; `pip check` would name
# the missing torch, on purpose.
# The torch-free engine modules the API does use (manifest, archive, bounds, imageio) need
# only scipy, numpy and pillow, which are installed.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first: this layer is rebuilt only when pyproject.toml changes.
COPY pyproject.toml README.md ./
COPY docker/requirements.py docker/requirements.py
RUN python docker/requirements.py --exclude torch torchvision scikit-learn matplotlib > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY smoothcert smoothcert
COPY service service
COPY clients clients
# The bundled demo model, so it can be registered from this container, and the example
# images the web console offers.
COPY models models
COPY examples examples
RUN pip install --no-deps . \
    && useradd --create-home --uid 10001 smoothcert

USER smoothcert
EXPOSE 8000
# Two processes, as SMOOTHCERT_API_WORKERS (the default of `smoothcert up`) and compose run it.
CMD ["uvicorn", "service.main:app", "--host", "0.0.0.0", "--port", "8000", "--workers", "2", "--timeout-graceful-shutdown", "5"]
