# Sourced by the experiments' run.sh scripts: they run their arms side by side, and most build
# on the polyp experiment's outputs.

# One intra-op thread per process: two processes share the 2 cores without spin-wait thrashing.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

work_dir() {  # work_dir DIR: make it; a failing stage then says its log is there
  mkdir -p "$1"
  # shellcheck disable=SC2064  # the folder is fixed now, on purpose
  trap "echo $(printf %q "run.sh: a stage failed; its log is in $1") >&2" ERR
}

need_polyp() {  # need_polyp DIR HOW PATH...: stop in one line unless DIR holds every PATH
  local dir=$1 how=$2 path
  shift 2
  for path in "$@"; do
    if [ ! -e "$dir/$path" ]; then
      echo "run.sh: $dir/$path is missing: run experiments/polyp_siamese_vs_maskonly/run.sh$how first" >&2
      exit 2
    fi
  done
}

knobs() {  # knobs NAME...: those environment knobs that are set, as the start of a rerun line
  local name
  for name in "$@"; do
    if [ -n "${!name:-}" ]; then printf '%s=%s ' "$name" "${!name@Q}"; fi
  done
}

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
