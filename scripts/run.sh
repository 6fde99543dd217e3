#!/usr/bin/env bash
# `make run`: migrate the embedded database, seed the demo, print how to use it,
# then serve in the foreground. Reads HOST and PORT (default 127.0.0.1:8000).
set -euo pipefail
cd "$(dirname "$0")/.."
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
PY=.venv/bin/python
export LITELLM_LOCAL_MODEL_COST_MAP=True

"$PY" manage.py migrate --noinput >/dev/null
seed=$("$PY" manage.py seed_demo)

owner=$(sed -n 's/^Owner [a-z ]*: \([^ ]*\).*/\1/p' <<<"$seed" | head -n1)
password=$(sed -n 's/^Generated password (shown once): //p' <<<"$seed")
key=$(sed -n 's/^Demo key: //p' <<<"$seed")
base="http://$HOST:$PORT"

cat <<BANNER

  LLM gateway (embedded mode: SQLite in var/, no Redis needed)

  Admin:    $base/admin/
  Login:    $owner
  Password: ${password:-(set when the owner was created; GATEWAY_OWNER_PASSWORD, or reset with: .venv/bin/python manage.py setup_gateway --email $owner --reset-password)}
  Demo key: $key
  API docs: $base/api/docs/

  Try:      curl -s $base/health

BANNER
exec "$PY" manage.py runserver "$HOST:$PORT" --noreload
