# Sourced by scripts/demo and scripts/test: find the interpreter for a Python version.
# pyenv installs (as on the project's machines) first, then whatever is on PATH.
find_python() {
  local version=$1 candidate
  for candidate in /root/.pyenv/versions/"$version".*/bin/python"$version" \
                   "$HOME"/.pyenv/versions/"$version".*/bin/python"$version" \
                   "$(command -v "python$version" 2>/dev/null)"; do
    if [ -x "$candidate" ] && "$candidate" -c 'import sys' >/dev/null 2>&1; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

# Create (or reuse) a virtual environment and install the project into it, editable.
make_venv() {
  local python=$1 venv=$2 extras=$3
  if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  fi
  "$venv/bin/python" -m pip install -q -e ".[$extras]" 2>&1 | grep -v '^WARNING: Location' || true
  "$venv/bin/python" -c 'import loopwatch' || { echo "installing into $venv failed" >&2; return 1; }
}
