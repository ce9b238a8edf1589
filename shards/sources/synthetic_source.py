"""``synthetic`` source: procedurally rendered scenes (see :mod:`shards.synthetic`)."""

from __future__ import annotations

from shards.items import Item, Listing
from shards.options import BuildOptions
from shards.splits import hash_split
from shards.synthetic import CLASSNAMES, TEMPLATES


def list_synthetic(input_path: str | None, opts: BuildOptions) -> Listing:
    """``opts.count`` scenes; captions and labels are filled in when a worker renders them."""
    val_f, test_f = opts.fractions("synthetic")
    items = []
    for i in range(opts.count):
        src = f"synthetic/{i:07d}"
        items.append(Item(src, hash_split(src, val_f, test_f), synthetic_index=i))
    return Listing(items, classnames=list(CLASSNAMES), templates=list(TEMPLATES),
                   info={"seed": opts.seed, "image_size": opts.image_size})
