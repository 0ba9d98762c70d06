#!/usr/bin/env bash
# Compile _lwaccel.c in place for one interpreter: bash experiments/accel/build.sh /path/to/python
set -euo pipefail
PY=${1:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
INC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
SUFFIX=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
OUT="$HERE/_lwaccel$SUFFIX"
gcc -O2 -g0 -fPIC -shared -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers \
    -I"$INC" "$HERE/_lwaccel.c" -o "$OUT"
echo "$OUT"
