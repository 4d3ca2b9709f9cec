"""Raw click logs and census tables to Parquet: one pipeline, two engines (DuckDB, Spark).

Example::

    from lazydp.preprocess import preprocess
    meta = preprocess("movielens", ["ratings.csv"], "out/movielens")
"""

from lazydp.preprocess.pipeline import PreprocessConfig, parse_buckets, preprocess
from lazydp.preprocess.vocabulary import PartitionSelection, split_budget

__all__ = ["PartitionSelection", "PreprocessConfig", "parse_buckets", "preprocess", "split_budget"]
