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
if [[ -n "$password" ]]; then
    password_note="$password   (generated; shown this once)"
elif [[ -n "${GATEWAY_OWNER_PASSWORD:-}" ]]; then
    password_note="(from GATEWAY_OWNER_PASSWORD)"
else
    password_note="(printed when it was created; reset: .venv/bin/python manage.py setup_gateway --email $owner --reset-password)"
fi

cat <<BANNER

  LLM gateway (embedded mode: SQLite in var/, no Redis needed)

  Admin:    $base/admin/
  Login:    $owner
  Password: $password_note
  Demo key: $key
  API docs: $base/api/docs/

  Try:      curl -s $base/health
            curl -s $base/v1/chat/completions -H "Authorization: Bearer $key" \\
                 -H 'Content-Type: application/json' \\
                 -d '{"model": "demo", "messages": [{"role": "user", "content": "Hello"}]}'
  Or, in Python (pip install openai):
            from openai import OpenAI
            client = OpenAI(base_url="$base/v1", api_key="$key")
            print(client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hello"}]).choices[0].message.content)

BANNER
exec "$PY" manage.py runserver "$HOST:$PORT" --noreload
