"""Peak memory of the sharded `merged` export (`cl-scale export --format merged` under the launcher) at the
Llama-2-7B shape.

    deepspeed --num_gpus 2 bench/export_7b_shape.py --out /tmp/merged7b [--shard-mb 1000] [--layers 32]

Random bf16 weights built partitioned from the first byte (as bench/zero3_7b_shape.py builds them), two
tasks' IncLoRA branches of rank 8 on the recipe's target modules with random B (so every merge computes),
then `cl_scale.export_sharded.write_sharded`, the writer the command runs: one module gathered at a time,
rank 0 folding the branches and filling shards of --shard-mb. Printed per rank: peak resident memory of
the build and of the export, against one full bf16 copy of the base (2 bytes x parameters), and the
export's wall time; rank 0 also the bytes written. The training peak to compare with is
bench/zero3_7b_shape.py's (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import peak_rss_bytes, reset_peak_rss
from transformers import AutoModelForCausalLM
from transformers.integrations.deepspeed import HfDeepSpeedConfig

from cl_scale import distributed as dist_utils
from cl_scale.cli import strip_local_rank
from cl_scale.ds_config import build_ds_config
from cl_scale.export_sharded import write_sharded
from cl_scale.modeling.wrapper import ContinualModel
from cl_scale.plan import PUBLIC_MODELS
from cl_scale.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "llama7b_order1.yaml"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to write (replaced)")
    parser.add_argument("--shard-mb", type=int, default=1000, help="largest shard, MB")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (fewer: a quick check)")
    args = parser.parse_args(argv)
    if dist_utils.accelerator_device().type == "cpu":
        torch.set_num_threads(1)
    dist_utils.init_distributed(timeout_s=1800)
    world = dist_utils.world_size()
    recipe = load_recipe(RECIPE, ["method.name=inclora", "method.rank=8", "train.per_device_batch=1",
                                  f"train.global_batch={world}"])
    ds_config = build_ds_config(recipe, world)
    handle = HfDeepSpeedConfig(ds_config)  # noqa: F841  (must live while the model is built)
    config = replace(PUBLIC_MODELS[recipe.model.path], layers=args.layers).config()
    start = time.perf_counter()
    base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    full_copy = 2 * sum(p.ds_numel for p in base.parameters())
    model = ContinualModel(base, kind="causal", target_modules=recipe.model.target_modules, rank=8,
                           alpha=recipe.method.alpha, dropout=0.0, gate_hidden=None)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        index = model.add_branches(generator)
        for layer in model.branched.values():
            b = layer.branch(index)[1]
            with torch.no_grad():
                b.copy_(torch.randn(b.shape, generator=generator).to(b.dtype) * 1e-3)
    build_peak, build_s = peak_rss_bytes(), time.perf_counter() - start
    if dist_utils.is_main():
        shutil.rmtree(args.out, ignore_errors=True)
        args.out.mkdir(parents=True)
    dist_utils.barrier()
    reset_peak_rss()
    start = time.perf_counter()
    write_sharded(model, None, args.out, args.shard_mb * 1024 * 1024)
    dist_utils.barrier()
    export_peak, export_s = peak_rss_bytes(), time.perf_counter() - start
    rows = dist_utils.all_gather_object((dist_utils.rank(), build_peak, build_s, export_peak, export_s))
    if dist_utils.is_main():
        written = sum(p.stat().st_size for p in args.out.glob("*.safetensors"))
        print(f"{args.layers} layers, {world} ranks, full bf16 copy {full_copy / 1e9:.2f} GB, shards of {args.shard_mb} MB")
        for rank, bp, bs, ep, es in rows:
            print(f"rank {rank}: build peak {bp / 1e9:.2f} GB ({bp / full_copy:.1%}, {bs:.0f} s)   "
                  f"export peak {ep / 1e9:.2f} GB ({ep / full_copy:.1%}, {es:.0f} s)")
        print(f"written: {written / 1e9:.2f} GB of safetensors in {args.out}")
    dist_utils.shutdown_distributed()


if __name__ == "__main__":
    main(strip_local_rank(sys.argv[1:])[0])
