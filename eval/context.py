"""What an evaluator gets: the benchmark, its loaded split, the shared extractor."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from eval.dataset import EvalDataset
from eval.features import FeatureExtractor

if TYPE_CHECKING:  # annotations only: benchmark -> registry -> evaluators -> context
    from eval.benchmark import BenchmarkSpec


class EvalError(RuntimeError):
    """A benchmark cannot be evaluated as defined (e.g. zero-shot without labels)."""


@dataclass
class EvalContext:
    """Inputs shared by all evaluators of one (model, benchmark) pair."""

    spec: BenchmarkSpec
    dataset: EvalDataset
    extractor: FeatureExtractor
    load_split: Callable[[str], EvalDataset]
    """Loads another split of the same benchmark (linear probes train on it)."""
    out_dir: Path | None = None
    """Where evaluators may write files (confusion matrices); None = write nothing."""
    info: dict[str, Any] = field(default_factory=dict)
    """Non-metric facts evaluators report (go into results.json)."""
    figures: dict[str, Path] = field(default_factory=dict)
    """Pictures evaluators wrote into ``out_dir``, by name (``confusion``, ``retrieval_examples``)."""

    def figure_path(self, name: str) -> Path | None:
        """Where the picture ``name`` goes (registered in :attr:`figures`); None = write none."""
        if self.out_dir is None:
            return None
        path = Path(self.out_dir) / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.figures[name] = path
        return path

    def labelled(self) -> tuple[list[int], list[int]]:
        """(sample indices, labels) of the labelled samples; EvalError if there are none."""
        idx = self.dataset.labelled
        if not idx or not self.dataset.classnames:
            raise EvalError(f"benchmark {self.spec.name}: no labelled samples / class names "
                            f"in split {self.spec.data.split!r} (excluded: {self.dataset.excluded})")
        return idx, [self.dataset.labels[i] for i in idx]
