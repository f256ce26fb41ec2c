#!/usr/bin/env bash
# Word timings for a manifest with the Montreal Forced Aligner (conda-forge: montreal-forced-aligner; not on PyPI).
#
#   scripts/align_mfa.sh MANIFEST OUT_DIR [en|zh] [JOBS]
#
# 1. builds MFA's corpus layout, OUT_DIR/corpus/<speaker>/<id>.<ext> (a link to the audio) + <id>.lab (transcript);
# 2. downloads the pretrained models once: english_us_arpa (acoustic + dictionary) for en, or mandarin_mfa acoustic
#    + mandarin_china_mfa dictionary for zh (MFA splits Chinese characters into words with its own tokenizer);
# 3. runs `mfa align` into OUT_DIR/textgrids/<speaker>/<id>.TextGrid;
# 4. checks each TextGrid against its transcript and writes OUT_DIR/manifest.aligned.jsonl with "words" attached,
#    printing the coverage (alignments that fail the check are reported and left out).
# Use the aligned manifest with data=manifest data.manifest=OUT_DIR/manifest.aligned.jsonl, or point a corpus
# config at the TextGrids with data.align_root=OUT_DIR/textgrids.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
MANIFEST=$(realpath "$1")
OUT=$(realpath -m "$2")
LANG_CODE=${3:-en}
JOBS=${4:-$(nproc)}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"

case "$LANG_CODE" in
  en) ACOUSTIC=english_us_arpa; DICTIONARY=english_us_arpa ;;
  zh) ACOUSTIC=mandarin_mfa; DICTIONARY=mandarin_china_mfa ;;
  *) echo "align_mfa.sh: language must be en or zh, got '$LANG_CODE'" >&2; exit 2 ;;
esac
command -v mfa >/dev/null || { echo "align_mfa.sh: 'mfa' not found; conda install -c conda-forge montreal-forced-aligner" >&2; exit 1; }

echo "[1/4] corpus layout -> $OUT/corpus"
"$PY" - "$MANIFEST" "$OUT/corpus" <<'PYEOF'
import sys
from pathlib import Path
from speech_redundancy.data.records import read_manifest

manifest, corpus = Path(sys.argv[1]), Path(sys.argv[2])
n = 0
for u in read_manifest(manifest):
    folder = corpus / str(u.extra.get("speaker") or "all")
    folder.mkdir(parents=True, exist_ok=True)
    audio = Path(u.audio).resolve()
    link = folder / f"{u.id}{audio.suffix}"
    if not link.exists():
        link.symlink_to(audio)
    (folder / f"{u.id}.lab").write_text(u.extra.get("transcript") or u.text, encoding="utf-8")
    n += 1
print(f"{n} utterances")
PYEOF

echo "[2/4] pretrained models: $ACOUSTIC / $DICTIONARY"
mfa model inspect acoustic "$ACOUSTIC" >/dev/null 2>&1 || mfa model download acoustic "$ACOUSTIC"
mfa model inspect dictionary "$DICTIONARY" >/dev/null 2>&1 || mfa model download dictionary "$DICTIONARY"

echo "[3/4] mfa align -> $OUT/textgrids"
mfa align --clean -j "$JOBS" "$OUT/corpus" "$DICTIONARY" "$ACOUSTIC" "$OUT/textgrids"

echo "[4/4] attach words -> $OUT/manifest.aligned.jsonl"
"$PY" - "$MANIFEST" "$OUT/textgrids" "$OUT/manifest.aligned.jsonl" <<'PYEOF'
import sys
from speech_redundancy.data.records import read_manifest, write_manifest
from speech_redundancy.data.textgrid import attach_alignments, coverage

manifest, textgrids, out = sys.argv[1:4]
failures = []
utts = attach_alignments(read_manifest(manifest), textgrids, on_error="skip", failures=failures)
write_manifest(out, utts)
for f in failures:
    print(f"not attached: {f['file']}: {f['error']}", file=sys.stderr)
print(f"{out}: word alignments for {coverage(utts):.1%} of {len(utts)} utterances")
PYEOF
