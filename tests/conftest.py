"""Session-wide test set-up."""

from __future__ import annotations

import os
import tempfile

# Ledger high-water marks (lazydp/ledger_mark.py) go to a directory of this test session, not
# the user's ~/.local/state; subprocesses (the CLI, torchrun workers) inherit it.
os.environ["LAZYDP_STATE_DIR"] = tempfile.mkdtemp(prefix="lazydp-state-")
