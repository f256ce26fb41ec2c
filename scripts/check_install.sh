#!/usr/bin/env bash
# The package installs with pip against the version ranges of pyproject.toml (without constraints.txt) into an
# environment that already holds torch, keeps that torch, and imports. Two fresh virtual environments, no
# --system-site-packages (a missing dependency must fail here):
# 1. the resolver, with torch of another in-range version installed (a metadata-only stand-in,
#    torch-$OTHER_TORCH.dist-info, so that no second torch is downloaded): `pip install --dry-run` must plan to
#    install everything else and not torch (with exact pins it would replace it);
# 2. a real install: torch at the version of constraints.txt first, then `pip install .`; torch must be the same
#    files afterwards (its RECORD unchanged), `pip check` must pass, and every module of speech_redundancy must import
#    from the installed copy (run outside the source tree).
# About 1-2 min with a warm pip cache. PYTHON picks the interpreter (default python3); KEEP=1 keeps the folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OTHER_TORCH=${OTHER_TORCH:-2.14.1}
root=$(pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/sr-check-install.XXXXXX")
[[ ${KEEP:-0} == 1 ]] || trap 'rm -rf "$work"' EXIT
pin=$(sed -n 's/^torch==//p' constraints.txt)
[[ -n $pin ]] || { echo "check-install: no torch pin in constraints.txt" >&2; exit 1; }

echo "check-install: 1/2 the resolver keeps an installed torch $OTHER_TORCH (pin: $pin)"
$PYTHON -m venv "$work/plan"
"$work/plan/bin/python" -m pip install -q --upgrade pip
site=$("$work/plan/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
stand_in="$site/torch-$OTHER_TORCH.dist-info"
mkdir "$stand_in"
printf 'Metadata-Version: 2.1\nName: torch\nVersion: %s\n' "$OTHER_TORCH" > "$stand_in/METADATA"
echo pip > "$stand_in/INSTALLER"
: > "$stand_in/RECORD"
"$work/plan/bin/python" -m pip install -q --dry-run --report "$work/plan.json" "$root"
"$work/plan/bin/python" - "$work/plan.json" <<'EOF'
import json, sys
plan = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.load(open(sys.argv[1]))["install"]}
if "torch" in plan:
    sys.exit(f"check-install: pip would replace the installed torch with {plan['torch']}")
if "speech-redundancy" not in plan and "speech_redundancy" not in plan:
    sys.exit(f"check-install: the plan does not install the package: {sorted(plan)}")
print(f"check-install: plan keeps torch and installs {len(plan)} distributions")
EOF

echo "check-install: 2/2 pip install . into a fresh environment holding torch==$pin"
$PYTHON -m venv "$work/env"
py="$work/env/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q --no-compile "torch==$pin"
record() { "$py" -c 'import importlib.metadata as m, hashlib; d = m.distribution("torch"); print(d.version, hashlib.sha256(d.read_text("RECORD").encode()).hexdigest())'; }
before=$(record)
"$py" -m pip install -q --no-compile "$root"
after=$(record)
[[ $before == "$after" ]] || { echo "check-install: torch changed: $before -> $after" >&2; exit 1; }
"$py" -m pip check
(cd "$work" && "$py" - <<'EOF'
import importlib, pkgutil
import speech_redundancy
assert "site-packages" in speech_redundancy.__file__, speech_redundancy.__file__
names = [m.name for m in pkgutil.walk_packages(speech_redundancy.__path__, "speech_redundancy.")]
for name in names:
    importlib.import_module(name)
import torch
print(f"check-install: torch {torch.__version__} kept; {len(names) + 1} modules of speech_redundancy import")
EOF
)
