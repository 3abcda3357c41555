#!/bin/sh
# The control run of docs/bench.md: this checkout's harness (bench/run.py) driving an
# earlier commit's code, so that a result and its control come from one harness on one
# day. Usage: bench/control.sh COMMIT [bench/run.py options]
#
# The earlier code is checked out in a worktree (KT_CONTROL_DIR, default
# /tmp/kt-control-COMMIT) with a venv of its own; the harness is copied there as
# bench/run_current.py with the adaptations that code needs, and its results go to
# bench/results/control-COMMIT/ of this checkout. The adaptations suit commits from
# before the usage path of issue 16 (3218d0e, say): no `leases` in the policy, Envoy's
# ext_proc as a flag (`ext_proc=`, not `usage=`), no `--admin` port, and no path_als
# configuration (that code has no access-log receiver).
set -eu
commit=$1
shift
root=$(git rev-parse --show-toplevel)
dir=${KT_CONTROL_DIR:-/tmp/kt-control-$commit}
[ -d "$dir" ] || git -C "$root" worktree add --detach "$dir" "$commit"
if [ ! -x "$dir/.venv/bin/python" ]; then
    python3 -m venv "$dir/.venv"
    "$dir/.venv/bin/pip" install -q -e "$dir[test]"
fi
cp "$root/bench/run.py" "$dir/bench/run_current.py"
cp "$root/bench/upstream.py" "$dir/bench/upstream.py"
python3 - "$dir/bench/run_current.py" <<'EOF'
import sys

path = sys.argv[1]
text = open(path).read()
for old, new in [
        ('usage="none"', "ext_proc=False"),
        ('usage=usage, authz_timeout_s=1.0)  # type: ignore[arg-type]',
         'ext_proc=(usage == "ext_proc"), authz_timeout_s=1.0)'),
        (", leases: true, ", ", "),
        ('    "path_als": ("http-authz", "als"),', "    # path_als: not in this code #"),
]:
    if old not in text:
        sys.exit(f"bench/control.sh: the harness changed, cannot adapt: {old!r}")
    text = text.replace(old, new)
open(path, "w").write(text)
EOF
cd "$dir"
exec .venv/bin/python bench/run_current.py --out "$root/bench/results/control-$commit" "$@"
