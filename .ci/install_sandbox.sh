#!/usr/bin/env bash
# The HumanEval sandbox runs programs under bubblewrap (no root needed at run time).
set -euo pipefail
if ! command -v bwrap >/dev/null; then
    apt-get update -qq && apt-get install -y -qq bubblewrap
fi
