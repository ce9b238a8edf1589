"""Input sources: each turns its input into a :class:`shards.items.Listing`."""

from __future__ import annotations

from typing import Callable

from shards.items import Listing
from shards.options import BuildOptions
from shards.sources.folder import list_folder
from shards.sources.karpathy import list_karpathy
from shards.sources.synthetic_source import list_synthetic
from shards.sources.table import list_csv

SOURCES: dict[str, Callable[[str, BuildOptions], Listing]] = {
    "folder": list_folder,
    "karpathy": list_karpathy,
    "csv": list_csv,
    "synthetic": list_synthetic,
}
