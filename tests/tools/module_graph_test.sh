#!/usr/bin/env bash
# tools/module-graph --check: passes on docs/architecture.md as committed, and fails (exit 1,
# naming the fix) on a copy whose generated section no longer matches the sources: a module
# dropped from the table, and an arrow added to the graph.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
graph="${root}/tools/module-graph"
scratch="$(mktemp -d)"
trap 'rm -rf "${scratch}"' EXIT

/usr/bin/python3 "${graph}" --check "${root}/docs/architecture.md"

expect_stale() {
  local file="$1" output code=0
  output=$(/usr/bin/python3 "${graph}" --check "${file}" 2>&1) || code=$?
  if [[ ${code} -ne 1 ]] || ! grep -q "is stale: run tools/module-graph --write" <<<"${output}"; then
    printf 'expected exit 1 and the fix for a stale %s, got %s:\n%s\n' "${file}" "${code}" "${output}"
    exit 1
  fi
}
grep -v '^| `meshrt.unix_socket` |' "${root}/docs/architecture.md" >"${scratch}/dropped.md"
cmp -s "${scratch}/dropped.md" "${root}/docs/architecture.md" && { echo "the edit did not apply"; exit 1; }
expect_stale "${scratch}/dropped.md"
sed 's/^    meshrt_alloc --> meshrt_core$/&\n    meshrt_core --> meshrt_alloc/' "${root}/docs/architecture.md" >"${scratch}/added.md"
cmp -s "${scratch}/added.md" "${root}/docs/architecture.md" && { echo "the edit did not apply"; exit 1; }
expect_stale "${scratch}/added.md"
echo "module-graph --check: current passes, stale copies fail"
