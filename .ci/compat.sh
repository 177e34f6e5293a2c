#!/usr/bin/env bash
# The supported range, proven: upgrade the main step's .venv to the newest releases the registry
# serves (not the tested set), run the family logit tests, swarm generations and the demo; then the
# same with the oldest transformers pyproject.toml allows, among the tested set. A failure names every package whose
# version differs from constraints.txt, so a breaking release is named with its version.
# It reuses .venv (it runs after the main step) instead of installing everything a second time, and
# puts the tested set back on the way out, so .venv stays what constraints.txt says.
# Usage: .ci/compat.sh TORCH_SPEC FLOOR
set -euo pipefail
cd "$(dirname "$0")/.."
torch_spec=$1
floor=$2
# Every family's logits in-process; one family through a real swarm (the others share its code
# paths there: the full swarm matrix runs in the main step); the demo end to end (its Ctrl-C tests
# exercise our own code only, so they run in the main step).
checks=(
    "tests/unit/test_families.py tests/unit/test_checkpoint.py"
    "tests/swarm/test_swarm_families.py -k llama"
    "tests/swarm/test_demo.py -k answers_paris"
)
newest=(transformers huggingface_hub hivemind langchain-core langchain-tests llama-index-core)
py=.venv/bin/python  # never whatever `python` the caller's PATH has: this script installs packages
pip=("$py" -m pip install -q)

# Package versions that differ from the tested set, one "name tested -> now" a line. A local
# version label is not a release ("torch 2.13.0+cpu" is the tested torch 2.13.0).
changed() {
    "$py" - <<'PY'
import re
from importlib.metadata import distributions

norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
pinned = {}
for line in open("constraints.txt"):
    m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line)
    if m:
        pinned[norm(m[1])] = m[2]
for dist in sorted(distributions(), key=lambda d: norm(d.metadata["Name"])):
    name = norm(dist.metadata["Name"])
    if name in pinned and pinned[name] != dist.version.split("+")[0]:
        print(f"  {name} {pinned[name]} -> {dist.version}")
PY
}

installed() {
    "$py" -m pip list --format=freeze --exclude-editable | sed 's/==.*//' | sort
}

run_checks() {
    local label=$1
    echo "-- $label: $("$py" -c 'import transformers, huggingface_hub, hivemind, torch; print("transformers", transformers.__version__, "| huggingface_hub", huggingface_hub.__version__, "| hivemind", hivemind.__version__, "| torch", torch.__version__)')"
    local check
    for check in "${checks[@]}"; do
        # shellcheck disable=SC2086  # each entry is a path plus its options
        if ! "$py" -m pytest -q -ra -p no:cacheprovider $check; then
            echo "FAILED on $label ($check). Versions that differ from the tested set (constraints.txt):"
            changed
            exit 1
        fi
    done
}

# The tested set again: changed versions back to their pins, packages the upgrade or the floor brought in
# removed (transformers 5.25 brings `kernels`, whose release then cannot be imported by transformers 5.0).
tested=$(installed)
back_to_tested() {
    local names extra
    names=$(changed | awk '{print $1}')
    # shellcheck disable=SC2086  # one package name a word
    [ -z "$names" ] || "${pip[@]}" -c constraints.txt $names
    extra=$(comm -13 <(echo "$tested") <(installed))
    # shellcheck disable=SC2086
    [ -z "$extra" ] || "$py" -m pip uninstall -q -y $extra
}
# On the way out, pass or fail. Not in CI (CI=true), whose clone is thrown away.
restore() {
    local status=$?
    back_to_tested
    exit "$status"
}
if [ "${CI:-}" != true ]; then
    trap restore EXIT
fi

# The newest releases of every dependency (eager: as a fresh install would get them), torch kept.
"${pip[@]}" --upgrade --upgrade-strategy eager -e ".[dev,langchain,llama-index]" "${newest[@]}" "$torch_spec"

# When the registry serves nothing newer than the tested set, the main step has already proven it.
newer=$(changed)
if [ -n "$newer" ]; then
    echo "Newer than the tested set:"
    echo "$newer"
    run_checks "the newest releases"
else
    echo "-- the newest releases are the tested set (constraints.txt): proven by the main step"
fi
# The floor among the tested set (not among the newest releases, which may need a newer transformers).
back_to_tested
"${pip[@]}" "transformers==$floor"
run_checks "transformers $floor (the floor in pyproject.toml)"
