# Production image of the LLM gateway: gunicorn + uvicorn workers serving ASGI.
# The same image runs the web server, the Celery worker and beat, and the
# one-off migrate job (see docker-compose.yml).
FROM python:3.11-slim-bookworm

# LITELLM_LOCAL_MODEL_COST_MAP: litellm would otherwise fetch its price map from
# the internet at import time; the gateway uses the copy shipped in the wheel.
ENV LITELLM_LOCAL_MODEL_COST_MAP=True \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed uid/gid so that volume permissions are predictable across rebuilds.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --home-dir /app \
        --no-create-home --shell /usr/sbin/nologin gateway

WORKDIR /app

# Dependencies first, in their own layer, so code changes do not reinstall them.
# requirements.txt pins every package with sha256 hashes: a tampered or
# unexpected artifact fails the build.
COPY requirements.txt .
RUN pip install --no-cache-dir --require-hashes -r requirements.txt

# The code stays owned by root: the server process cannot modify it.
COPY . .

# collectstatic only imports settings, which insist on SECRET_KEY whenever
# DATABASE_URL is set; neither value outlives this command. The SQLite URL keeps
# the build away from any real database (and from embedded mode's var/ dir).
# /app/var is writable because embedded mode (no DATABASE_URL) keeps its SQLite
# file and generated key there, and every mode its settlement journal
# (/app/var/journal, a volume in docker-compose.yml).
RUN SECRET_KEY=build-only-collectstatic-key-not-used-at-runtime-0123456789 \
    DATABASE_URL=sqlite:////tmp/build.sqlite3 \
    python manage.py collectstatic --noinput \
    && rm -f /tmp/build.sqlite3 \
    && mkdir -p /app/var/journal \
    && chown -R gateway:gateway /app/var

USER gateway

EXPOSE 8000

# Shell form through `exec` so ${WEB_CONCURRENCY} expands at run time and
# gunicorn becomes PID 1, receiving docker's SIGTERM for a graceful stop.
CMD ["sh", "-c", "exec gunicorn gateway_project.asgi:application -k uvicorn_worker.UvicornWorker --bind 0.0.0.0:8000 --workers ${WEB_CONCURRENCY:-2}"]
