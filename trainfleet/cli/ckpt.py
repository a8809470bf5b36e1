"""``trainfleet ckpt inspect|convert``: look into and convert checkpoints of any supported format."""
from __future__ import annotations

import argparse
from typing import Any

from trainfleet.cli.common import OneLineParser


def _ckpt_inspect(ns: argparse.Namespace) -> int:
    from trainfleet.engine.checkpoint.tools import format_inspection, inspect_checkpoint

    print(format_inspection(inspect_checkpoint(ns.path, trust=ns.trust_pickle)))
    return 0


def _ckpt_convert(ns: argparse.Namespace) -> int:
    from trainfleet.engine.checkpoint.foreign import parse_size
    from trainfleet.engine.checkpoint.tools import convert_checkpoint

    size = parse_size(ns.max_shard_size) if ns.max_shard_size is not None else None
    out = convert_checkpoint(ns.src, ns.dst, to_state_dict=ns.to_state_dict, trust=ns.trust_pickle, to=ns.to,
                             ema=ns.ema, prefix=ns.prefix, max_shard_size=size)
    kind = {"state_dict": "plain state_dict", "sharded": "sharded trainfleet checkpoint",
            "safetensors": "safetensors, a folder of shards with model.safetensors.index.json" if out.is_dir()
            else "safetensors"}.get("state_dict" if ns.to_state_dict else ns.to, "trainfleet checkpoint")
    print(f"wrote {out} ({kind})")
    return 0


def add_ckpt_commands(sub: Any) -> None:
    """``trainfleet ckpt inspect PATH`` and ``trainfleet ckpt convert IN OUT``."""
    ckpt_parser = sub.add_parser("ckpt", help="inspect or convert checkpoints")
    ckpt_sub = ckpt_parser.add_subparsers(dest="ckpt_command", required=True, parser_class=OneLineParser)
    inspect = ckpt_sub.add_parser("inspect", help="metadata and a table of tensors")
    inspect.add_argument("path", help="a checkpoint file, a sharded folder, or a folder with latest.json")
    inspect.set_defaults(func=_ckpt_inspect)
    convert = ckpt_sub.add_parser("convert", help="between a file, a sharded folder, a plain state_dict and "
                                                  "safetensors (timm, Lightning, HF, Accelerate checkpoints too)")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument("--to-state-dict", action="store_true", help="write a plain state_dict for other tools")
    convert.add_argument("--to", choices=["file", "sharded", "state_dict", "safetensors"],
                         help="file (one trainfleet file, default), sharded (a folder for "
                              "torch.distributed.checkpoint, loads into any world size), state_dict, or "
                              "safetensors (weights only)")
    convert.add_argument("--max-shard-size", help="with --to safetensors: shards of at most this size "
                                                  "(5GB, 500MB, bytes) and a model.safetensors.index.json")
    convert.add_argument("--ema", action="store_true", help="take a timm checkpoint's EMA weights")
    convert.add_argument("--prefix", help="keep only the weights under this attribute, without it "
                                          "(e.g. model. for a LightningModule's self.model)")
    convert.set_defaults(func=_ckpt_convert)
    for command in (inspect, convert):
        command.add_argument("--trust-pickle", action="store_true",
                             help="allow files that need full unpickling (only files you trust)")
