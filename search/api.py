"""The Python surface of ``search`` (what benchmarks and other code import)."""

from search.ann import AnnChoice, build as build_ann, choose as choose_ann, exact_neighbors, recall_at_k, tune
from search.build import build_index
from search.errors import SearchError
from search.locate import LocateResult, locate
from search.options import AnnOptions, IndexOptions, LocateOptions, QueryOptions, ServeOptions
from search.query import Hit, Searcher
from search.store import SearchIndex

__all__ = [
    "AnnChoice", "AnnOptions", "Hit", "IndexOptions", "LocateOptions", "LocateResult", "QueryOptions", "SearchError",
    "SearchIndex", "Searcher", "ServeOptions", "build_ann", "build_index", "choose_ann", "exact_neighbors",
    "locate", "recall_at_k", "tune",
]
