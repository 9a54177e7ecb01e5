#!/usr/bin/env bash
# Checks web/rowcast.d.ts against example.ts with `tsc --noEmit`. TypeScript comes from npm into
# target/typescript (never a global install); pinned to a major version so a new release cannot
# break the check by itself.
set -euo pipefail
cd "$(dirname "$0")/../.."
tools=target/typescript
if [ ! -x "$tools/node_modules/.bin/tsc" ]; then
  mkdir -p "$tools"
  npm install --silent --no-audit --no-fund --prefix "$tools" typescript@5
fi
"$tools/node_modules/.bin/tsc" -p tests/typescript/tsconfig.json
echo "rowcast.d.ts: tsc --noEmit passed"
