"""Export a DeepSpeed checkpoint of ours to a plain open_clip state_dict (no DeepSpeed needed to load it).

    python -m train.engines.deepspeed.export CKPT_DIR OUT.pt

The user-facing command is ``python -m train export RUN_OR_CHECKPOINT --format pt|hf|open_clip
--out DIR`` (:mod:`train.export`), which calls :func:`export_state_dict` for a ZeRO step folder
without ``model.pt`` and writes a loadable folder with a model card; this module stays as the
low-level tool (one ``.pt`` file, nothing else).

``CKPT_DIR`` is a checkpoint folder written by :class:`train.engines.deepspeed.engine.DeepSpeedEngine`
(``runs/NAME/checkpoints/step_0001000``), or a ``checkpoints`` folder / run directory whose
``latest`` pointer names one. Works offline on one process for ZeRO stages 1-3: DeepSpeed's
``zero_to_fp32`` reassembles the fp32 master weights from every rank's shard; the
0-dim parameters the engine reshaped to ``[1]`` are reshaped back.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

META_FILE = "orbitclip_ds.json"  # same name as train.engines.deepspeed.engine.META_FILE (no deepspeed import here)


class ExportError(ValueError):
    """The folder is not a DeepSpeed checkpoint this tool can export."""


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder meant by ``path`` (itself, or what a ``latest`` file points to)."""
    p = Path(path)
    for candidate in (p, p / "checkpoints"):
        if (candidate / META_FILE).is_file():
            return candidate
        latest = candidate / "latest"
        if latest.is_file():
            target = candidate / latest.read_text().strip()
            if (target / META_FILE).is_file():
                return target
    raise ExportError(
        f"{p} is not a DeepSpeed checkpoint of ours (no {META_FILE}; for a DDP checkpoint use its model.pt directly)"
    )


def export_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The consolidated fp32 open_clip state_dict of a DeepSpeed checkpoint folder."""
    ckpt = find_checkpoint(path)
    meta = json.loads((ckpt / META_FILE).read_text())
    if meta["zero_stage"] == 0:
        raise ExportError(f"{ckpt} was written without ZeRO: its model.pt already is the consolidated state_dict")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=meta["tag"])
    out = {}
    for k, v in state.items():
        v = v.detach().cpu().contiguous()
        out[k] = v.reshape(()) if k in meta["scalar_params"] and v.numel() == 1 else v
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    ap = argparse.ArgumentParser(prog="python -m train.engines.deepspeed.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="checkpoint folder (or checkpoints/ or run dir with a 'latest' pointer)")
    ap.add_argument("out", help="output .pt file (torch.load-able dict of tensors)")
    args = ap.parse_args(argv)
    try:
        state = export_state_dict(args.checkpoint)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(state, tmp)
    tmp.replace(out)
    print(f"wrote {len(state)} tensors to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
