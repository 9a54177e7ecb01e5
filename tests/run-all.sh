#!/usr/bin/env bash
# Runs every check rowcast has, the same way CI does: formatting, lints, unit and integration
# tests (each test process starts its own private PostgreSQL cluster), the headless-Chromium tests
# (tests/it/browser.rs: among them a page over HTTPS/HTTP2 receiving changes on a WebSocket over
# HTTP/2), and the `.http` request file against a live server. Installs what a fresh Debian/Ubuntu machine lacks (as root via
# apt-get; otherwise it says what to install).
set -euo pipefail
cd "$(dirname "$0")/.."

need_packages=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_packages+=(postgresql)
command -v runuser >/dev/null 2>&1 || need_packages+=(util-linux)
command -v npm >/dev/null 2>&1 || need_packages+=(nodejs npm)
command -v cc >/dev/null 2>&1 || need_packages+=(build-essential)
command -v pkg-config >/dev/null 2>&1 || need_packages+=(pkg-config)
# Debian's Chromium and its WebDriver, for tests/it/browser.rs (never a downloaded browser build).
command -v chromium >/dev/null 2>&1 || need_packages+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_packages+=(chromium-driver)
# Debian's pebble (Let's Encrypt's test ACME server), for tests/it/acme.rs.
command -v pebble >/dev/null 2>&1 || need_packages+=(pebble)
# Debian's nginx, for tests/it/proxy.rs (three instances behind the README's proxy config).
[ -x /usr/sbin/nginx ] || need_packages+=(nginx)
# schemathesis (PyPI) runs from a venv under target/.
python3 -c "import venv, ensurepip" >/dev/null 2>&1 || need_packages+=(python3-venv)
if ((${#need_packages[@]})); then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing ${need_packages[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_packages[@]}"
  else
    echo "missing: ${need_packages[*]} — install them with: sudo apt-get install ${need_packages[*]}" >&2
    exit 1
  fi
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy (the whole workspace: rowcast and crates/*)"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== rowcast.d.ts: tsc --noEmit against tests/typescript/example.ts (typescript from npm, local)"
tests/typescript/check.sh
echo "== cargo build (release binary for the live checks)"
cargo build --release --locked
echo "== cargo test (the whole workspace: rowcast and crates/*)"
# Chromium, pebble and nginx are installed above, so their tests must run, not skip.
ROWCAST_BROWSER_TEST=require ROWCAST_ACME_TEST=require ROWCAST_NGINX_TEST=require cargo test --workspace --locked

echo "== .http request file against a live server"
data_dir=$(mktemp -d /tmp/rowcast-http-XXXXXX)
chmod 755 "$data_dir"
port=18089
./target/release/rowcast --listen "127.0.0.1:$port" --embedded-data-dir "$data_dir/pgdata" \
  >"$data_dir/server.log" 2>&1 &
server=$!
cleanup() {
  kill -TERM "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  rm -rf "$data_dir"
}
trap cleanup EXIT
for _ in $(seq 1 600); do
  curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
  kill -0 "$server" 2>/dev/null || { cat "$data_dir/server.log"; exit 1; }
  sleep 0.1
done
http/run.sh "http://127.0.0.1:$port"
echo "== schemathesis: property-based API test from /openapi.json"
if [ ! -x target/schemathesis/bin/schemathesis ]; then
  python3 -m venv target/schemathesis
  target/schemathesis/bin/pip install -q schemathesis
fi
# Fails on any 5xx, undocumented status, wrong content type, or body that breaks its schema.
# The event stream never ends, so it is left to the SSE tests.
target/schemathesis/bin/schemathesis run "http://127.0.0.1:$port/openapi.json" \
  --checks not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance \
  --exclude-path /products/events --max-examples 30 --request-timeout 10 \
  --generation-deterministic
echo "== bench smoke (bench/ci-smoke.sh: floor + rowcast on its embedded default)"; bench/ci-smoke.sh "$PWD/target/release/rowcast"
echo "== screenshots kept as CI artifacts: target/dashboard.png, target/dashboard-activity.png"
echo "== all checks passed"
