"""The feature atlas: per-feature statistics, examples, logit effects and neighbours, in Parquet with DuckDB
on top; HTML and terminal views; cross-lingual features over aligned passages."""

from mri.atlas.build import build_atlas
from mri.atlas.crosslingual import crosslingual
from mri.atlas.html import write_html
from mri.atlas.reader import Atlas
from mri.atlas.show import show_feature
from mri.atlas.split import split_of

__all__ = ["Atlas", "build_atlas", "crosslingual", "show_feature", "split_of", "write_html"]
