"""Settings, read from environment variables only (the README lists them all).

With no environment at all the gateway runs embedded: a SQLite file under var/,
a local-memory cache and Celery tasks executed eagerly in-process.
"""

import os
import secrets
import warnings
from datetime import timedelta
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from gateway_project.env import (
    env_bool,
    env_choice,
    env_database,
    env_int,
    env_list,
    env_price_pair,
    env_redis_url,
    env_str,
)

# Must precede any possible import of litellm (see gateway_project/__init__.py).
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("GATEWAY_VAR_DIR", str(BASE_DIR / "var")))

DEBUG = env_bool("DEBUG", False)
DATABASE_URL = env_str("DATABASE_URL")
EMBEDDED = not DATABASE_URL


def _secret_key() -> str:
    value = env_str("SECRET_KEY")
    if value:
        if len(value) < 32:
            raise ImproperlyConfigured("SECRET_KEY must be at least 32 characters")
        return value
    if not EMBEDDED:
        raise ImproperlyConfigured(
            "SECRET_KEY must be set when DATABASE_URL is set (every instance "
            "of a deployment must share it)"
        )
    # Embedded mode: one generated key, kept beside the SQLite file so that
    # sessions, demo keys and encrypted credentials survive a restart.
    path = VAR_DIR / "secret_key"
    if not path.exists():
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = _secret_key()
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])
# How many proxies of ours stand in front of the gateway (X-Forwarded-For).
TRUSTED_PROXY_COUNT = env_int("TRUSTED_PROXY_COUNT", 0)
if env_bool("TRUST_X_FORWARDED_PROTO", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

INSTALLED_APPS = [
    "gateway_project.apps.GatewayAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "accounts",
    "tenants",
    "billing",
    "routing",
]

MIDDLEWARE = [
    "gateway_project.middleware.RequestIdMiddleware",
    "gateway_project.middleware.DatabaseUnavailableMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "gateway_project.middleware.StaticFilesMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

# /v1/ (the OpenAI-compatible API) runs behind these only (asgi.py).
API_MIDDLEWARE = [
    "gateway_project.middleware.RequestIdMiddleware",
    "gateway_project.middleware.DatabaseUnavailableMiddleware",
    "gateway_project.middleware.ApiMiddleware",
]

ROOT_URLCONF = "gateway_project.urls"
WSGI_APPLICATION = "gateway_project.wsgi.application"
ASGI_APPLICATION = "gateway_project.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------
if EMBEDDED:
    VAR_DIR.mkdir(parents=True, exist_ok=True)
_database = env_database("DATABASE_URL", f"sqlite:///{VAR_DIR / 'db.sqlite3'}")
if _database["ENGINE"] == "django.db.backends.postgresql":
    # A pool per process (psycopg_pool). Under ASGI every request runs its
    # database work in a thread of its own, so Django's persistent
    # connections (CONN_MAX_AGE) would pile up one per thread.
    _pool_size = env_int("DATABASE_POOL_MAX_SIZE", 20, minimum=0)
    if _pool_size:
        _database["CONN_MAX_AGE"] = 0
        _database.setdefault("OPTIONS", {})["pool"] = {
            "min_size": 1,
            "max_size": _pool_size,
            "timeout": env_int("DATABASE_POOL_TIMEOUT", 5, minimum=1),
        }
    else:
        _database["CONN_MAX_AGE"] = env_int("DATABASE_CONN_MAX_AGE", 0)
        _database["CONN_HEALTH_CHECKS"] = True
    # The request path's two money statements (billing/statements.py) are
    # prepared on each connection at their second use, so PostgreSQL stops
    # parsing and planning them per call. Django's own queries never are (they
    # bind on the client). Off for a pooler that cannot keep prepared
    # statements (PgBouncer before 1.21 in transaction mode).
    if env_bool("DATABASE_PREPARED_STATEMENTS", True):
        _database.setdefault("OPTIONS", {})["prepare_threshold"] = 1
# Transactions stay short and explicit (services); never one per request, which
# would hold a transaction open across a provider call.
_database["ATOMIC_REQUESTS"] = False
DATABASES = {"default": _database}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: cache, broker -------------------------------------------------
REDIS_URL = env_redis_url("REDIS_URL")
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": env_str("CACHE_KEY_PREFIX", "gw"),
            "OPTIONS": {
                "CLIENT_CLASS": "django_redis.client.DefaultClient",
                "SOCKET_CONNECT_TIMEOUT": 2,
                "SOCKET_TIMEOUT": 2,
                # Redis down degrades the cache to "always a miss" (keys read
                # from the database, no response cache, no shared cooldowns)
                # instead of failing requests; rate limits follow
                # GATEWAY_RATE_LIMIT_FAIL_OPEN.
                "IGNORE_EXCEPTIONS": True,
            },
        }
    }
    DJANGO_REDIS_LOG_IGNORED_EXCEPTIONS = True
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

CELERY_BROKER_URL = env_redis_url("CELERY_BROKER_URL", REDIS_URL) or "memory://"
CELERY_RESULT_BACKEND = None
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", not REDIS_URL)
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_TIME_LIMIT = env_int("CELERY_TASK_TIME_LIMIT", 300, minimum=1)
CELERY_TASK_SOFT_TIME_LIMIT = max(CELERY_TASK_TIME_LIMIT - 30, 1)
# Holds older than this, that no settlement followed, are settled by
# reconciliation (a process died mid-call).
GATEWAY_STALE_HOLD_SECONDS = env_int("GATEWAY_STALE_HOLD_SECONDS", 900, minimum=60)
# The settlement journal (billing/journal.py): settlements the database could
# not take, and the progress of streams, on this machine's disk; a process
# applies its own every GATEWAY_JOURNAL_RETRY_SECONDS, and dead processes'.
GATEWAY_JOURNAL_DIR = Path(env_str("GATEWAY_JOURNAL_DIR", str(VAR_DIR / "journal")))
GATEWAY_JOURNAL_RETRY_SECONDS = env_int("GATEWAY_JOURNAL_RETRY_SECONDS", 5, minimum=0)
# A job still open this long after it was created is closed as expired by
# the jobs_expire task; its held credit (job_based teams) is captured if the
# job recorded a successful call and released otherwise.
GATEWAY_JOB_TTL_SECONDS = env_int("GATEWAY_JOB_TTL_SECONDS", 86400, minimum=60)
# Usage rollups cover an hour (a day) once it has been over this long, so
# that calls settling at the boundary are inside.
GATEWAY_ROLLUP_GRACE_SECONDS = env_int("GATEWAY_ROLLUP_GRACE_SECONDS", 120, minimum=0)
# Raw usage records older than this are deleted, in batches, once rolled up.
GATEWAY_USAGE_RETENTION_DAYS = env_int("GATEWAY_USAGE_RETENTION_DAYS", 90, minimum=1)
GATEWAY_RETENTION_BATCH_SIZE = env_int("GATEWAY_RETENTION_BATCH_SIZE", 5000, minimum=1)
# How often beat runs key sync (expiry marking, cache refresh, last_used flush).
GATEWAY_KEY_SYNC_INTERVAL_SECONDS = env_int(
    "GATEWAY_KEY_SYNC_INTERVAL_SECONDS", 10, minimum=1
)
CELERY_BEAT_SCHEDULE: dict[str, dict[str, object]] = {
    "reconcile-credit-accounts": {
        "task": "billing.credit_accounts_reconcile",
        "schedule": 3600,
    },
    "settle-stale-holds": {"task": "billing.holds_settle_stale", "schedule": 300},
    "expire-jobs": {"task": "billing.jobs_expire", "schedule": 300},
    "sync-keys": {
        "task": "tenants.virtual_keys_sync",
        "schedule": GATEWAY_KEY_SYNC_INTERVAL_SECONDS,
    },
    "reset-budgets": {"task": "billing.budgets_reset", "schedule": 60},
    "refill-credits": {"task": "billing.credit_accounts_refill", "schedule": 300},
    "roll-up-usage": {"task": "billing.usage_roll_up", "schedule": 300},
    "prune-usage": {"task": "billing.usage_prune", "schedule": 3600},
}

# --- Auth -----------------------------------------------------------------
AUTH_USER_MODEL = "accounts.User"
AUTH_PASSWORD_VALIDATORS = [
    {
        "NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"
    },
    {
        "NAME": "django.contrib.auth.password_validation.MinimumLengthValidator",
        "OPTIONS": {"min_length": 8},
    },
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# The shared key for X-Admin-Key; empty disables that way of authenticating.
GATEWAY_ADMIN_KEY = env_str("GATEWAY_ADMIN_KEY")
# Keys that digest virtual-key secrets and encrypt provider credentials. Both
# default to values derived from SECRET_KEY; set them explicitly in production
# so that rotating SECRET_KEY does not invalidate keys or credentials.
GATEWAY_KEY_DIGEST_SECRET = env_str("GATEWAY_KEY_DIGEST_SECRET")
GATEWAY_ENCRYPTION_KEYS = env_list("GATEWAY_ENCRYPTION_KEYS", [])
GATEWAY_KEY_PREFIX = env_str("GATEWAY_KEY_PREFIX", "sk-gw")
if not GATEWAY_KEY_PREFIX.replace("-", "").isalnum():
    raise ImproperlyConfigured("GATEWAY_KEY_PREFIX must be letters, digits and '-'")

SIMPLE_JWT = {
    "ACCESS_TOKEN_LIFETIME": timedelta(
        minutes=env_int("JWT_ACCESS_MINUTES", 60, minimum=1)
    ),
    "AUTH_HEADER_TYPES": ("Bearer",),
    "USER_ID_FIELD": "id",
    "USER_ID_CLAIM": "user_id",
    "SIGNING_KEY": SECRET_KEY,
    # Tokens carry a digest of the password hash: changing the password
    # invalidates every token issued before.
    "CHECK_REVOKE_TOKEN": True,
}
# Routing: a deployment with this many retryable failures within the window
# (or one 429) cools down, for every gateway process (Redis).
GATEWAY_COOLDOWN_FAILURES = env_int("GATEWAY_COOLDOWN_FAILURES", 3, minimum=1)
GATEWAY_FAILURE_WINDOW_SECONDS = env_int(
    "GATEWAY_FAILURE_WINDOW_SECONDS", 60, minimum=1
)
GATEWAY_COOLDOWN_SECONDS = env_int("GATEWAY_COOLDOWN_SECONDS", 30, minimum=1)
# Money on the request path. A call without max_tokens holds (and is capped
# at) this many completion tokens. A model with no price in the price book nor
# in litellm's map is not routed to, unless a fallback price is set here
# ("input,output" USD per million tokens).
GATEWAY_DEFAULT_MAX_TOKENS = env_int("GATEWAY_DEFAULT_MAX_TOKENS", 4096, minimum=1)
GATEWAY_FALLBACK_PRICE = env_price_pair("GATEWAY_FALLBACK_PRICE_PER_MILLION")
# A call whose hold is this many times smaller than the team's available
# credits (as this process last saw them) writes its hold with its settlement,
# in one statement (a stream: while the provider opens it), instead of before
# the provider is called. 0: always before.
GATEWAY_DEFERRED_HOLD_MARGIN = env_int("GATEWAY_DEFERRED_HOLD_MARGIN", 100, minimum=0)
# Rate limits live in Redis; when it cannot be reached, admit (fail-open) or
# refuse with 503 (fail-closed). /readyz reports Redis either way.
GATEWAY_RATE_LIMIT_FAIL_OPEN = env_bool("GATEWAY_RATE_LIMIT_FAIL_OPEN", True)
# Serve deployments whose provider speaks OpenAI's protocol with the lean
# pass-through adapter (routing/passthrough.py) instead of litellm.
GATEWAY_PASSTHROUGH = env_bool("GATEWAY_PASSTHROUGH", True)
# The request path keeps model groups, deployments and prices in memory this
# long at most; writes through the services and the admin apply at once.
GATEWAY_ROUTE_CACHE_SECONDS = env_int("GATEWAY_ROUTE_CACHE_SECONDS", 5, minimum=0)
# Login throttling (accounts/throttle.py): failures allowed per window.
LOGIN_FAILURES_PER_EMAIL = env_int("LOGIN_FAILURES_PER_EMAIL", 5, minimum=1)
LOGIN_FAILURES_PER_IP = env_int("LOGIN_FAILURES_PER_IP", 20, minimum=1)
LOGIN_FAILURE_WINDOW_SECONDS = env_int("LOGIN_FAILURE_WINDOW_SECONDS", 900, minimum=1)

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": [],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": [
        "gateway_project.inputs.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "gateway_project.errors.drf_exception_handler",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "LLM Gateway API",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI's assets from the sidecar package, not a CDN: the docs work
    # on deployments without internet access.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# --- Static files, i18n ---------------------------------------------------
STATIC_URL = "static/"
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(BASE_DIR / "staticfiles")))
# Serve straight from the apps' static folders when collectstatic has not run
# (the embedded default); production images run collectstatic.
WHITENOISE_USE_FINDERS = not STATIC_ROOT.exists()
if WHITENOISE_USE_FINDERS:
    # Expected before collectstatic has run: the finders serve the files.
    warnings.filterwarnings("ignore", message="No directory at")
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# --- Logging --------------------------------------------------------------
LOG_LEVEL = env_choice(
    "LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
)
# json (default): one JSON object per line with the request id; plain: text.
LOG_FORMAT = env_str("LOG_FORMAT", "json")
if LOG_FORMAT not in ("json", "plain"):
    raise ImproperlyConfigured("LOG_FORMAT must be json or plain")
# Prompt and completion text are logged only when an operator turns this on.
GATEWAY_LOG_PROMPTS = env_bool("GATEWAY_LOG_PROMPTS", False)
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_id": {"()": "gateway_project.logs.RequestIdFilter"}},
    "formatters": {
        "plain": {
            "format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
        },
        "json": {"()": "gateway_project.logs.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["request_id"],
        }
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {"LiteLLM": {"level": "WARNING"}, "httpx": {"level": "WARNING"}},
}
