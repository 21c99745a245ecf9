# Sourced by scripts/main.sh and scripts/test.sh: the virtual environment $VENV (default
# .venv), made with `python3 -m venv` if absent, activated, and scripts/install.sh run in it.
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
. "$VENV/bin/activate"
bash scripts/install.sh
