#!/usr/bin/env bash
# Submit `nyxray merge` or `nyxray sweep` to a running Ray cluster with
# `ray job submit`, then follow the job's logs until it ends.
set -euo pipefail

PROG=$(basename "$0")

usage() {
  cat <<EOF
usage: $PROG [options] merge|sweep RECIPE OUT [nyxray options...]

Submits 'nyxray merge|sweep RECIPE OUT ...' as a Ray job and follows its logs.
RECIPE is a local file: its directory is uploaded as the job's working_dir
(model weights, .git and virtualenvs excluded), so a sweep's member recipes
next to it travel too.  OUT and model locations must be URLs the cluster can
reach (s3://..., hf://...): local paths would be paths on the cluster's nodes.
Everything after OUT goes to nyxray unchanged, e.g.
  --device cuda --actors 4 --actor-gpus 1 --models-root s3://bucket/models

options (before merge|sweep):
  --address URL        Ray dashboard / job server address
                       (default: \$RAY_API_SERVER_ADDRESS, \$RAY_ADDRESS,
                       else http://127.0.0.1:8265, as opened by 'ray dashboard')
  --working-dir DIR    upload DIR (which must contain RECIPE) instead of the
                       recipe's directory
  --pip SPEC           also pip-install SPEC in the job's runtime env
                       (repeatable; for clusters without nyxray preinstalled)
  --env NAME           pass the local variable NAME to the job (repeatable)
  --no-env             pass no AWS_* / HF_* variables to the job
  --submission-id ID   Ray job submission id (default: nyxray-CMD-TIMESTAMP)
  --no-wait            submit and return without following the logs
  -h, --help           show this help

By default the AWS_* and HF_* variables set here (credentials, region,
endpoint, token) are passed to the job through the runtime env's env_vars,
except paths (*_FILE, *_PATH, *_HOME, *_DIR, *_CACHE, *_BUNDLE) and
AWS_PROFILE.  Values are never printed, but Ray stores the runtime env with
the job: anyone who can read the cluster's dashboard can read them.  Use
--no-env on clusters whose nodes have their own credentials (instance profile).

Exit status: 0 when the job succeeded, 1 when it failed, 2 on a usage error.
EOF
}

die_usage() {
  echo "$PROG: $*" >&2
  echo "Try '$PROG --help'." >&2
  exit 2
}

ADDRESS=""
WORKING_DIR=""
SUBMISSION_ID=""
PASS_ENV=1
NO_WAIT=0
PIP_SPECS=()
EXTRA_ENV=()

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --address) [ $# -ge 2 ] || die_usage "--address needs a value"; ADDRESS=$2; shift 2 ;;
    --address=*) ADDRESS=${1#*=}; shift ;;
    --working-dir) [ $# -ge 2 ] || die_usage "--working-dir needs a value"; WORKING_DIR=$2; shift 2 ;;
    --working-dir=*) WORKING_DIR=${1#*=}; shift ;;
    --pip) [ $# -ge 2 ] || die_usage "--pip needs a value"; PIP_SPECS+=("$2"); shift 2 ;;
    --pip=*) PIP_SPECS+=("${1#*=}"); shift ;;
    --env) [ $# -ge 2 ] || die_usage "--env needs a value"; EXTRA_ENV+=("$2"); shift 2 ;;
    --env=*) EXTRA_ENV+=("${1#*=}"); shift ;;
    --no-env) PASS_ENV=0; shift ;;
    --submission-id) [ $# -ge 2 ] || die_usage "--submission-id needs a value"; SUBMISSION_ID=$2; shift 2 ;;
    --submission-id=*) SUBMISSION_ID=${1#*=}; shift ;;
    --no-wait) NO_WAIT=1; shift ;;
    --) shift; break ;;
    -*) die_usage "unknown option: $1" ;;
    *) break ;;
  esac
done

[ $# -ge 3 ] || die_usage "expected: merge|sweep RECIPE OUT"
CMD=$1
RECIPE=$2
OUT=$3
shift 3
case "$CMD" in
  merge|sweep) ;;
  *) die_usage "unknown command '$CMD' (expected merge or sweep)" ;;
esac

for name in ${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"}; do
  case "$name" in
    ''|[0-9]*|*[!A-Za-z0-9_]*) die_usage "--env: not a variable name: '$name'" ;;
  esac
done

PYTHON=${PYTHON:-python3}
command -v "$PYTHON" >/dev/null 2>&1 || { echo "$PROG: $PYTHON not found (set PYTHON=...)" >&2; exit 2; }
command -v ray >/dev/null 2>&1 || { echo "$PROG: 'ray' not found on PATH (pip install 'ray[default]')" >&2; exit 2; }

# The recipe travels in the job's working_dir; name it relative to that.
[ -f "$RECIPE" ] || die_usage "recipe not found: $RECIPE (a local file)"
recipe_abs="$(cd "$(dirname "$RECIPE")" && pwd -P)/$(basename "$RECIPE")"
if [ -z "$WORKING_DIR" ]; then
  WORKING_DIR=$(dirname "$recipe_abs")
fi
[ -d "$WORKING_DIR" ] || die_usage "working dir not found: $WORKING_DIR"
WORKING_DIR=$(cd "$WORKING_DIR" && pwd -P)
case "$recipe_abs" in
  "$WORKING_DIR"/*) JOB_RECIPE=${recipe_abs#"$WORKING_DIR"/} ;;
  *) die_usage "recipe $RECIPE is not inside working dir $WORKING_DIR" ;;
esac

if [ -z "$ADDRESS" ] && [ -z "${RAY_API_SERVER_ADDRESS:-}" ] && [ -z "${RAY_ADDRESS:-}" ]; then
  ADDRESS="http://127.0.0.1:8265"
fi
if [ -z "$SUBMISSION_ID" ]; then
  SUBMISSION_ID="nyxray-$CMD-$(date -u +%Y%m%d-%H%M%S)-$RANDOM"
fi

# Build the runtime env in Python, which reads the variables' values from its
# own environment: values never appear on a command line, in a file or on the
# terminal.  Only the names are printed (on stderr).
RUNTIME_ENV_JSON=$(
  NYXRAY_SUBMIT_PASS_ENV=$PASS_ENV \
  NYXRAY_SUBMIT_WORKING_DIR=$WORKING_DIR \
  "$PYTHON" - ${PIP_SPECS[@]+"${PIP_SPECS[@]}"} --env ${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"} <<'PY'
import json
import os
import re
import sys

args = sys.argv[1:]
split = args.index("--env")
pip_specs, extra = args[:split], args[split + 1:]

passthrough = re.compile(r"^(AWS|HF)_[A-Z0-9_]+$|^HUGGING_FACE_HUB_TOKEN$")
# Local paths and profile names mean nothing on the cluster's nodes.
local_only = re.compile(r"(_FILE|_PATH|_HOME|_DIR|_CACHE|_BUNDLE)$|^AWS_PROFILE$|^AWS_CONTAINER_")

names = []
if os.environ.get("NYXRAY_SUBMIT_PASS_ENV") == "1":
    names = sorted(
        n for n in os.environ if passthrough.match(n) and not local_only.search(n)
    )
for n in extra:
    if n not in os.environ:
        sys.exit(f"submit.sh: --env {n}: variable is not set")
    if n not in names:
        names.append(n)

env = {"env_vars": {n: os.environ[n] for n in names}}
wd = os.environ.get("NYXRAY_SUBMIT_WORKING_DIR")
if wd:
    env["working_dir"] = wd
    env["excludes"] = [
        ".git", ".venv", "venv", "__pycache__", "*.safetensors", "*.bin",
        "*.pt", "*.pth", "*.gguf", "*.ckpt", "*.h5", "*.onnx",
    ]
if pip_specs:
    env["pip"] = pip_specs
if names:
    print("submit.sh: passing to the job: " + ", ".join(names), file=sys.stderr)
elif (os.environ.get("NYXRAY_SUBMIT_PASS_ENV") == "1"
      and os.environ.get("AWS_PROFILE")):
    print("submit.sh: AWS_PROFILE is set but not passed; the nodes use their own "
          "credentials (export AWS_ACCESS_KEY_ID etc. to pass keys)", file=sys.stderr)
print(json.dumps(env))
PY
)

ENTRYPOINT=(nyxray "$CMD" "$JOB_RECIPE" "$OUT" "$@")
SUBMIT_ARGS=(job submit --submission-id "$SUBMISSION_ID")
if [ -n "$ADDRESS" ]; then
  SUBMIT_ARGS+=(--address "$ADDRESS")
fi
if [ "$NO_WAIT" = 1 ]; then
  SUBMIT_ARGS+=(--no-wait)
fi

echo "$PROG: submitting $SUBMISSION_ID: ${ENTRYPOINT[*]}" >&2
if [ "$NO_WAIT" = 0 ]; then
  echo "$PROG: following logs; Ctrl-C stops following, not the job (ray job stop $SUBMISSION_ID)" >&2
fi

# The runtime env reaches `ray` through a pipe (/dev/fd/N), not argv or a file.
# `ray job submit` follows the logs and exits 1 if the job fails.
ray "${SUBMIT_ARGS[@]}" --runtime-env <(printf '%s\n' "$RUNTIME_ENV_JSON") -- "${ENTRYPOINT[@]}"
