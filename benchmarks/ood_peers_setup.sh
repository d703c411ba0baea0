#!/usr/bin/env bash
# The peers' own virtualenv for benchmarks/ood_features.py: madmom 0.16.1 (RNN beat / downbeat + DBN trackers)
# and BeatNet, which cannot live in the product's lock (madmom builds only with numpy < 2 and Cython < 3.1;
# BeatNet pins numba 0.54 and imports pyaudio). Idempotent: a venv that already imports both is left alone.
#
#   bash benchmarks/ood_peers_setup.sh [VENV]        # default benchmarks/.venv-peers
#
# Everything comes from PyPI (torch: the CPU wheel the machine's pip finds). Compatibility fixes, none of which
# changes what the trackers compute:
# - numpy 1.26 dropped the np.float / np.int / np.bool aliases and Python 3.10 the collections ABC aliases that
#   madmom 0.16.1 still uses: a `sitecustomize.py` in the venv puts them back before anything imports madmom.
# - BeatNet is installed without its pins (numba==0.54.1 does not exist for Python 3.11) and its `import pyaudio`
#   (live microphone input only) is satisfied by an empty module; the offline mode never touches it.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="${1:-$HERE/.venv-peers}"
PY="${PYTHON:-python3.11}"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import madmom, BeatNet.BeatNet" 2>/dev/null; then
    echo "peers venv ready: $VENV"
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${PIP[@]}" "pip>=23" "setuptools<70" wheel
"${PIP[@]}" "numpy==1.26.4" "cython==3.0.12" "scipy==1.13.1" "mido==1.3.3" "soundfile==0.14.0"
"${PIP[@]}" --no-build-isolation "madmom==0.16.1"

SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# madmom 0.16.1's DBNDownBeatTrackingProcessor stacks (path, log-probability) tuples into one array to pick the
# best bar length, which numpy >= 1.24 refuses (ragged); take the log-probabilities alone (same argmax).
sed -i 's/best = np.argmax(np.asarray(results)\[:, 1\])/best = np.argmax([r[1] for r in results])/' \
    "$SITE/madmom/features/downbeats.py"
cat > "$SITE/sitecustomize.py" <<'EOF'
# Compatibility aliases for madmom 0.16.1 under numpy >= 1.24 and Python >= 3.10 (written by ood_peers_setup.sh).
import collections
import collections.abc
import warnings

import numpy as np

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for _name, _type in (("float", float), ("int", int), ("bool", bool), ("complex", complex), ("object", object)):
        if not hasattr(np, _name):
            setattr(np, _name, _type)
for _name in ("MutableSequence", "Sequence", "Mapping", "MutableMapping", "Iterable", "Callable"):
    if not hasattr(collections, _name):
        setattr(collections, _name, getattr(collections.abc, _name))
EOF

# BeatNet: torch (CPU) + librosa + numba compatible with numpy 1.26, then BeatNet itself without its pins.
# the versions this benchmark was run with (torch: the CPU wheel the machine's index serves)
"${PIP[@]}" "torch==2.14.1" "librosa==0.10.2.post1" "numba==0.60.0" "matplotlib==3.11.2"
"${PIP[@]}" --no-deps "BeatNet==1.1.3"
# madmom imports pkg_resources, which setuptools >= 81 no longer ships; torch's wish for setuptools >= 77 only
# serves its C++ extension builder, which nothing here uses.
"${PIP[@]}" "setuptools<70"
if ! "$VENV/bin/python" -c "import pyaudio" 2>/dev/null; then
    # BeatNet/BeatNet.py imports pyaudio at module level for its live microphone mode, which the benchmark
    # never uses; an empty module satisfies the import.
    echo '"""Empty: BeatNet imports pyaudio for live input only (ood_peers_setup.sh)."""' > "$SITE/pyaudio.py"
fi
"$VENV/bin/python" -c "import madmom, BeatNet.BeatNet; print('madmom', madmom.__version__)"
echo "peers venv ready: $VENV"
