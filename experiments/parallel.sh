# Sourced by the experiments' run.sh scripts that run their arms side by side.

stop_tree() {  # stop_tree PID: the process and everything it started, children first
  local child
  for child in $(pgrep -P "$1"); do stop_tree "$child"; done
  kill "$1" 2>/dev/null || true
}

wait_all() {  # wait_all PID...: until all have ended; the first failure stops the others
  local pending=("$@") ended pid still
  while [ "${#pending[@]}" -gt 0 ]; do
    if ! wait -n -p ended "${pending[@]}"; then
      for pid in "$@"; do stop_tree "$pid"; done
      echo "an arm failed, so the other was stopped: see the logs" >&2
      return 1
    fi
    still=()
    for pid in "${pending[@]}"; do
      if [ "$pid" != "$ended" ]; then still+=("$pid"); fi
    done
    pending=(${still[@]+"${still[@]}"})
  done
}
