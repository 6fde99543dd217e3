#!/usr/bin/env bash
# install-litellm.sh — the LiteLLM proxy the benchmark compares against, in its
# own virtualenv (bench/.venv-litellm), from PyPI. Skipped when that exact
# version is already installed there.
#
#   PYTHON=python3 bench/install-litellm.sh
#
# The version is pinned. Releases 1.82.7, 1.82.8 and every 1.107.x were
# compromised and are refused, whatever LITELLM_VERSION says.
#
# If `pip install litellm[proxy]==VERSION` cannot be resolved (a dependency
# pinned by that release is not on the index), litellm itself is installed at
# exactly VERSION without dependencies, then its and the proxy extra's
# requirements are installed, relaxing only those pip reports as not found to
# their newest available version. Each relaxation is written to
# bench/.venv-litellm/.bench-install-notes, which the report prints.
set -euo pipefail

cd "$(dirname "$0")"
VERSION=${LITELLM_VERSION:-1.109.1}
PYTHON=${PYTHON:-python3}
VENV=.venv-litellm
STAMP=$VENV/.bench-installed
NOTES=$VENV/.bench-install-notes

log() { printf 'install-litellm: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

case "$VERSION" in
    1.82.7 | 1.82.8 | 1.107.*) die "litellm $VERSION is a compromised release: refusing" ;;
esac

if [[ -f $STAMP && "$(cat "$STAMP")" == "$VERSION" && -x $VENV/bin/litellm ]]; then
    log "litellm[proxy]==$VERSION already in bench/$VENV"
    exit 0
fi

log "installing litellm[proxy]==$VERSION into bench/$VENV (takes a minute or two)"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
LOG=$VENV/.bench-install.log
: >"$NOTES"

if "${PIP[@]}" install "litellm[proxy]==$VERSION" >"$LOG" 2>&1; then
    log "installed"
else
    grep -E '^ERROR' "$LOG" | grep -v 'is ignored' | tail -n 3 | cut -c1-200 >&2 || true
    log "the release's own pins do not resolve here: installing litellm==$VERSION" \
        "without dependencies, then its requirements"
    "${PIP[@]}" install --quiet --no-deps "litellm==$VERSION" >>"$LOG" 2>&1 \
        || die "pip install litellm==$VERSION failed (log: bench/$LOG)"
    REQS=$VENV/.bench-requirements.txt
    # Base requirements and the proxy extra's, for this interpreter.
    "$VENV/bin/python" - >"$REQS" <<'EOF'
import importlib.metadata as metadata

from pip._vendor.packaging.requirements import Requirement

wanted = set()
for raw in metadata.requires("litellm") or []:
    requirement = Requirement(raw)
    if requirement.marker is not None and not any(
        requirement.marker.evaluate({"extra": extra}) for extra in ("", "proxy")
    ):
        continue
    requirement.marker = None
    wanted.add(str(requirement))
print("\n".join(sorted(wanted)))
EOF
    for _ in 1 2 3 4 5 6; do
        if "${PIP[@]}" install -r "$REQS" >>"$LOG" 2>&1; then
            break
        fi
        missing=$(grep -oE 'No matching distribution found for [A-Za-z0-9_.-]+' "$LOG" \
            | tail -n 1 | awk '{print $NF}')
        [[ -n "$missing" ]] || die "installing the requirements failed (log: bench/$LOG)"
        wanted=$(grep -iE "^${missing//[-_.]/[-_.]}([<>=!~ \[]|$)" "$REQS" | head -n 1)
        [[ -n "$wanted" ]] || die "pip could not find $missing (log: bench/$LOG)"
        grep -viE "^${missing//[-_.]/[-_.]}([<>=!~ \[]|$)" "$REQS" >"$REQS.new" || true
        echo "$missing" >>"$REQS.new"
        mv "$REQS.new" "$REQS"
        log "relaxed: $wanted -> newest $missing on the index"
        echo "LiteLLM install: litellm $VERSION asks for \`$wanted\`, which the package index does not have; installed the newest $missing instead." >>"$NOTES"
    done
    "${PIP[@]}" install -r "$REQS" >>"$LOG" 2>&1 \
        || die "installing the requirements failed (log: bench/$LOG)"
fi

installed=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))')
[[ "$installed" == "$VERSION" ]] || die "bench/$VENV has litellm $installed, not $VERSION"
case "$installed" in
    1.82.7 | 1.82.8 | 1.107.*) rm -rf "$VENV"; die "litellm $installed is a compromised release" ;;
esac
[[ -x $VENV/bin/litellm ]] || die "no litellm command in bench/$VENV"
for name in $(grep -oE 'installed the newest [A-Za-z0-9_.-]+' "$NOTES" | awk '{print $NF}'); do
    have=$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$name'))")
    sed -i "s/installed the newest $name instead\./installed $name $have instead./" "$NOTES"
done
echo "$VERSION" >"$STAMP"
log "litellm $installed ready in bench/$VENV"
