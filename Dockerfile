# syntax=docker/dockerfile:1
# Slim, non-root image of the billing service with its pinned dependencies.
# Migrations are a separate step, never run at app start:
#   docker run --rm --env-file prod.env IMAGE alembic upgrade head
#   docker run -p 8000:8000 --env-file prod.env IMAGE
FROM python:3.11-slim AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml ./
COPY app ./app
RUN python -m venv /opt/venv && /opt/venv/bin/pip install .

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 APP_ENV=production
RUN useradd --system --uid 10001 --home-dir /app billing
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY alembic.ini ./
COPY migrations ./migrations
COPY app ./app
USER billing
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"
# No uvicorn access log: requests are counted and timed per route and status in /metrics,
# rejections and errors are logged as structured JSON events, and the load balancer logs every
# request (README "Running in production").
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers", "--no-server-header", "--no-access-log"]
