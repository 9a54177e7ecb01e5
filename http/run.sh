#!/usr/bin/env bash
# Runs every request in http/products.http with httpyac against a live rowcast server and fails
# (non-zero exit) if any request errors or any `??` assertion fails.
#
#   http/run.sh [BASE_URL]      BASE_URL defaults to http://localhost:8080
#
# httpyac is installed on first use into http/.httpyac/ (git-ignored), pinned below; node and
# npm must be on PATH. httpyac lets the file's own `@baseUrl = ...` line win over `--var` and
# environments, so the requests are sent from a scratch copy of the file with that one line
# replaced by BASE_URL.
set -euo pipefail

HTTPYAC_VERSION=6.16.7

usage() { echo "usage: http/run.sh [BASE_URL]   (default http://localhost:8080)"; }
case "${1:-}" in
  -h | --help) usage; exit 0 ;;
esac
if (($# > 1)); then
  usage >&2
  exit 2
fi
base_url=${1:-http://localhost:8080}
base_url=${base_url%/}
if ! [[ $base_url =~ ^https?://[^[:space:]/]+(/[^[:space:]]*)?$ ]]; then
  echo "http/run.sh: BASE_URL must look like http://host:port, got '$base_url'" >&2
  exit 2
fi

cd "$(dirname "$0")/.."
http_file=http/products.http
prefix=http/.httpyac
httpyac=$PWD/$prefix/node_modules/.bin/httpyac

for tool in node npm; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "http/run.sh: $tool is missing (Debian/Ubuntu: apt-get install nodejs npm)" >&2
    exit 1
  }
done

installed=$(node -p "require('./$prefix/node_modules/httpyac/package.json').version" 2>/dev/null || true)
if [[ ! -x $httpyac || $installed != "$HTTPYAC_VERSION" ]]; then
  echo "== installing httpyac@$HTTPYAC_VERSION into $prefix/"
  mkdir -p "$prefix"
  npm install --prefix "$prefix" --no-audit --no-fund --loglevel=error \
    "httpyac@$HTTPYAC_VERSION" >/dev/null
fi

# The scratch copy: the same requests, with only the base URL line replaced.
if [[ $(grep -c '^@baseUrl = ' "$http_file") != 1 ]]; then
  echo "http/run.sh: $http_file must have exactly one '@baseUrl = ...' line" >&2
  exit 1
fi
# It lives outside the repo (httpyac skips git-ignored files, such as anything under
# http/.httpyac/) and httpyac runs from its directory (it wants the file under its cwd).
work=$(mktemp -d "${TMPDIR:-/tmp}/rowcast-http.XXXXXX")
trap 'rm -rf "$work"' EXIT
copy=$work/products.http
log=$work/output.log
awk -v url="$base_url" '/^@baseUrl = /{ print "@baseUrl = " url; next } { print }' \
  "$http_file" >"$copy"
expected=$(grep -cE '^(GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS) ' "$http_file" || true)

echo "== httpyac $HTTPYAC_VERSION: $http_file against $base_url ($expected requests)"
start=$(date +%s.%N)
set +e
(cd "$work" && "$httpyac" send products.http --all --output short --output-failed exchange \
  --timeout 10000) 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
elapsed=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')

# httpyac's last line: "N requests processed (N succeeded)", or with ", N failed" / "errored".
summary=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -E '^[0-9]+ requests? processed' | tail -n 1 || true)
succeeded=$(sed -nE 's/.*[(, ]([0-9]+) succeeded.*/\1/p' <<<"$summary")
if ((status != 0)); then
  echo "http/run.sh: FAILED (httpyac exit $status) after ${elapsed}s: ${summary:-no summary}" >&2
  exit "$status"
fi
if [[ $succeeded != "$expected" ]]; then
  echo "http/run.sh: FAILED: expected $expected requests to succeed, httpyac says: ${summary:-nothing}" >&2
  exit 1
fi
echo "http/run.sh: all $expected requests passed against $base_url in ${elapsed}s"
