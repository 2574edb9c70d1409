#!/usr/bin/env bash
# Generate API clients from openapi.yaml into OUT (default: generated/). Not committed.
#   Python:     openapi-python-client  -> OUT/python/billing_api_client
#   TypeScript: openapi-typescript types + openapi-fetch (tests/contract/ts) -> OUT/ts/schema.d.ts
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$ROOT/generated}"
mkdir -p "$OUT/python" "$OUT/ts"
PATH="$ROOT/.venv/bin:$PATH" openapi-python-client generate --path "$ROOT/openapi.yaml" \
  --meta none --output-path "$OUT/python/billing_api_client" --overwrite
if [ "${SKIP_TS:-0}" != "1" ]; then
  (cd "$ROOT/tests/contract/ts" && npm ci --silent --no-audit --no-fund \
     && npx openapi-typescript "$ROOT/openapi.yaml" -o "$OUT/ts/schema.d.ts")
fi
