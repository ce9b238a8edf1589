"""``python -m search index|query|locate|serve``: find images by text, by image, and where a
feature lies in a large scene."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Callable

from search.errors import SearchError
from search.options import AnnOptions, IndexOptions, LocateOptions, QueryOptions, ServeOptions
from train.api import PeerError, dist_env_from

if TYPE_CHECKING:
    from search.store import SearchIndex

EXAMPLES = {
    "index": """example:
  python -m search index --model runs/recipes/rsicd_scratch_cpu --shards runs/shards/ucm_captions \\
      --split val --out runs/search/ucm-val
  torchrun --nproc_per_node 4 -m search index --model hf:clip-vit-b32 --shards data/a data/b --out idx
    (each rank embeds its own shards; the output folder must be on storage every rank sees)""",
    "query": """examples:
  python -m search query runs/search/ucm-val --text "a baseball field" -k 10
  python -m search query runs/search/ucm-val --image my_scene.jpg --json
  python -m search query runs/search/ucm-val --key 1081 --grid similar.png""",
    "locate": """example:
  python -m search locate --model runs/recipes/rsicd_scratch_cpu --image scene.tif \\
      --text "storage tanks" --tile 224 --stride 112 --out runs/locate/tanks
    (a GeoTIFF also gets top_tiles.geojson in its own coordinate system)""",
    "serve": """example:
  python -m search serve runs/search/ucm-val --port 8000     # then open http://127.0.0.1:8000/""",
}


def _bands(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected band numbers like 4,3,2, got {text!r}") from None


def _sub(sub: argparse._SubParsersAction, name: str, help_: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_, description=help_, epilog=EXAMPLES[name],
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m search", description=__doc__,
                                epilog="\n\n".join(EXAMPLES.values()), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    i = _sub(sub, "index", "embed every image of shard folders and build a faiss index")
    i.add_argument("--model", required=True, help="run dir, ARCH, ARCH:TAG_OR_FILE, local-dir:DIR, hf:DIR")
    i.add_argument("--shards", nargs="+", required=True, metavar="DIR",
                   help="`shards build` outputs or folders of .tar files (webdataset)")
    i.add_argument("--split", dest="splits", action="append", help="only this split (repeatable; default all)")
    i.add_argument("--out", required=True, help="index folder to write")
    i.add_argument("--index", dest="kind", default="auto", choices=["auto", "flat", "hnsw", "ivf", "ivfpq"],
                   help="faiss index (auto: exact up to --exact-max, then HNSW / IVF / IVF-PQ by size and memory)")
    i.add_argument("--exact-max", type=int, default=AnnOptions.exact_max)
    i.add_argument("--memory-mb", type=float, default=AnnOptions.memory_mb, help="memory budget of the faiss index")
    i.add_argument("--recall-queries", type=int, default=AnnOptions.recall_queries,
                   help="queries used to measure recall@10 against exact search")
    i.add_argument("--batch-size", type=int, default=256)
    i.add_argument("--device", default="auto", help="auto (this rank's GPU if any), cpu, cuda, cuda:1 ...")
    i.add_argument("--overwrite", action="store_true", help="replace an existing index in --out")
    i.add_argument("--no-progress", action="store_true")
    q = _sub(sub, "query", "text -> image or image -> image search in an index")
    q.add_argument("index", help="index folder")
    q.add_argument("--text", help="find images matching this text")
    q.add_argument("--image", help="find images similar to this image file")
    q.add_argument("--key", help="find images similar to this indexed item (key or source:split/key)")
    q.add_argument("-k", type=int, default=10, help="results to return")
    q.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    q.add_argument("--grid", help="write a contact sheet PNG of the results here")
    q.add_argument("--model", help="embed the query with this model (default: the index's; must be the same)")
    q.add_argument("--device", default="auto")
    loc = _sub(sub, "locate", "tile a large image and rank the tiles for a phrase")
    loc.add_argument("--model", required=True)
    loc.add_argument("--image", required=True, help="scene: JPEG, PNG, TIFF or GeoTIFF")
    loc.add_argument("--text", required=True)
    loc.add_argument("--out", required=True, help="output folder")
    loc.add_argument("--tile", type=int, default=224, help="tile side in pixels")
    loc.add_argument("--stride", type=int, default=None, help="step between tiles (default: tile/2)")
    loc.add_argument("--top", type=int, default=10, help="best tiles to write and print")
    loc.add_argument("--bands", type=_bands, help="raster bands as R,G,B (1-based), e.g. 4,3,2")
    loc.add_argument("--batch-size", type=int, default=64)
    loc.add_argument("--device", default="auto")
    loc.add_argument("--no-progress", action="store_true")
    s = _sub(sub, "serve", "a local web page over an index")
    s.add_argument("index")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    s.add_argument("-k", type=int, default=12, help="results per query")
    s.add_argument("--model", help="as for query")
    s.add_argument("--device", default="auto")
    return p


def cmd_index(a: argparse.Namespace) -> int:
    from search.build import build_index
    from search.store import SearchIndex

    opts = IndexOptions(model=a.model, shards=a.shards, out=a.out, splits=a.splits, device=a.device,
                        batch_size=a.batch_size, overwrite=a.overwrite, progress=not a.no_progress,
                        ann=AnnOptions(kind=a.kind, exact_max=a.exact_max, memory_mb=a.memory_mb,
                                       recall_queries=a.recall_queries))
    out = build_index(opts)
    if dist_env_from(os.environ).is_main:
        print(describe_index(SearchIndex(out)))
    return 0


def describe_index(index: SearchIndex) -> str:
    """Summary lines of an index's metadata."""
    m = index.meta
    inputs, ix, model = m["inputs"], m["index"], m["model"]
    reasons = ", ".join(f"{k} {v}" for k, v in inputs["skipped_reasons"].items())
    search = ix["search"]
    knob = f", {search['param']}={search['value']}" if search.get("param") else ""
    recalls = ", ".join(f"{k} queries {v:.3f}" for k, v in search["recall@10"].items())
    secs = m["build_seconds"]
    return "\n".join([
        f"indexed {inputs['indexed']} of {inputs['total']} inputs ({inputs['skipped']} skipped"
        + (f": {reasons}" if reasons else "") + f") from {m['shards']['count']} shard(s)",
        f"model {model['spec']} ({model['arch']}, dim {m['dim']}, digest {model['digest']}) on {m['device']}, "
        f"{m['world_size']} process(es)",
        f"faiss index: {ix['kind']}{' ' + json.dumps(ix['params']) if ix['params'] else ''}{knob} ({ix['reason']})",
        f"recall@10 vs exact: {recalls}" + ("" if search["target_reached"] else
                                              f" (target {search['target']} not reached)"),
        f"time: load model {secs.get('load_model', 0):.1f}s, embed {secs['embed']:.1f}s, index {secs['index']:.2f}s, recall {secs['tune']:.2f}s, "
        f"total {secs['total']:.1f}s",
        f"wrote {index.path}",
    ])


def cmd_query(a: argparse.Namespace) -> int:
    from search.query import Searcher, format_table
    from search.store import SearchIndex

    opts = QueryOptions(index=a.index, text=a.text, image=a.image, key=a.key, k=a.k, model=a.model,
                        device=a.device, json=a.json, grid=a.grid)
    opts.validate()
    searcher = Searcher(SearchIndex(opts.index), opts.model, opts.device)
    if opts.text is not None:
        hits, what = searcher.by_text(opts.text, opts.k), f'text "{opts.text}"'
    elif opts.image is not None:
        hits, what = searcher.by_image_file(opts.image, opts.k), f"image {opts.image}"
    else:
        hits, what = searcher.by_key(opts.key, opts.k), f"key {opts.key}"
    if opts.grid:
        from search.grid import write_grid

        path = write_grid(searcher.index, hits, opts.grid, f"{what} -> top {len(hits)} of {len(searcher.index)}")
        print(f"wrote {path}", file=sys.stderr if opts.json else sys.stdout)
    if opts.json:
        print(json.dumps({"index": str(searcher.index.path), "query": {"text": opts.text, "image": opts.image,
                                                                         "key": opts.key},
                          "k": opts.k, "results": [h.to_dict() for h in hits]}, indent=1, ensure_ascii=False))
    else:
        print(f"{what}: top {len(hits)} of {len(searcher.index)} ({searcher.index.meta['index']['kind']} index)")
        print(format_table(hits))
    return 0


def cmd_locate(a: argparse.Namespace) -> int:
    from search.locate import format_top, locate

    opts = LocateOptions(model=a.model, image=a.image, text=a.text, out=a.out, tile=a.tile, stride=a.stride,
                         top=a.top, bands=a.bands, device=a.device, batch_size=a.batch_size,
                         progress=not a.no_progress)
    result = locate(opts)
    w, h = result.scene.size
    geo = f", {result.scene.georef.crs}" if result.scene.georef else ", not georeferenced"
    print(f'"{opts.text}" in {result.scene.path.name} ({w}x{h} px{geo}): {len(result.tiles)} tiles of '
          f"{opts.tile} px, stride {opts.stride}")
    print(format_top(result, opts.top))
    for name, path in result.files.items():
        print(f"wrote {name}: {path}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from search.web import make_app_server

    server, url = make_app_server(ServeOptions(index=a.index, host=a.host, port=a.port, k=a.k, model=a.model,
                                               device=a.device))
    print(f"serving {a.index} at {url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "index": cmd_index, "query": cmd_query, "locate": cmd_locate, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (2 for bad input, with one line on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except SearchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PeerError as e:  # a rank of a torchrun build failed; every rank says which and why
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `... | head`: the reader left; not an error of ours, and no traceback for it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
