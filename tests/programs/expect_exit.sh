#!/usr/bin/env bash
# expect_exit.sh CODE PATTERN... -- COMMAND...: runs COMMAND; passes when it exits with CODE and
# its combined output matches every extended regex PATTERN (each on some line).
set -u
expected_code="$1"
shift
patterns=()
while (($# > 0)) && [[ $1 != "--" ]]; do patterns+=("$1"); shift; done
shift
output=$("$@" 2>&1)
code=$?
if [[ ${code} -ne ${expected_code} ]]; then
  printf 'expected exit %s, got %s from: %s\n%s\n' "${expected_code}" "${code}" "$*" "${output}"
  exit 1
fi
for pattern in "${patterns[@]}"; do
  if ! grep -Eq -- "${pattern}" <<<"${output}"; then
    printf 'output of %s does not match /%s/:\n%s\n' "$*" "${pattern}" "${output}"
    exit 1
  fi
done
