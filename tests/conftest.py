"""Session-wide test set-up."""

from __future__ import annotations

import os
import tempfile

# Ledger high-water marks (lazydp/ledger_mark.py) go to a directory of this test session, not
# the user's ~/.local/state; subprocesses (the CLI, torchrun workers) inherit it.
os.environ["LAZYDP_STATE_DIR"] = tempfile.mkdtemp(prefix="lazydp-state-")
# Built-in datasets (lazydp/data/real.py) are preprocessed into a cache of this session, not the
# user's ~/.cache/lazydp: an entry there is keyed by the package version, not the code, so one
# left by another commit stood in for this commit's preprocessing, and test sessions running
# at once shared it.
os.environ["LAZYDP_CACHE"] = tempfile.mkdtemp(prefix="lazydp-cache-")
