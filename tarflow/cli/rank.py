"""tarflow-rank: CRM/IGM block ranking of a checkpoint and the schedule derived from it."""

from __future__ import annotations

import argparse
import json

from tarflow.app.checks.common import refuse_unwritable
from tarflow.app.cli_args import add_data_args, add_model_args, model_from_args, probe_images
from tarflow.files import atomic_write
from tarflow.sampling import format_schedule, rank_blocks, ranking_table, schedule_from_ranking
from tarflow.sampling.ranking import NORMS, ranking_records


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tarflow-rank",
        description="Rank a TarFlow's blocks by CRM (share of the total) and IGM per initial "
        "guess on real images, and print the GS-Jacobi schedule chosen from that ranking.",
        epilog="example: tarflow-rank outputs/demo/.../checkpoints/last.ckpt --data demo")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--norm", default="spectral", choices=list(NORMS))
    p.add_argument("--tol", type=float, default=1e-3, help="tolerance of the suggested schedule")
    p.add_argument("--tough-factor", type=float, default=1.5)
    p.add_argument("--tough-segments", type=int, default=8)
    p.add_argument("--json", help="also write the ranking and schedule to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    refuse_unwritable(args, files={"json": "--json"})
    model, space = model_from_args(args)
    images, where = probe_images(args, model, space)
    ranking = rank_blocks(model, images, norm=args.norm)
    schedule = schedule_from_ranking(ranking, model.config.num_patches, tol=args.tol,
                                     tough_factor=args.tough_factor,
                                     tough_segments=args.tough_segments)
    print(f"{model.config.tag}, N={model.config.num_patches}; probe: {where}; norm: {args.norm}")
    print(ranking_table(ranking, schedule))
    text = format_schedule(schedule)
    print(f"suggested schedule (the paper's rule, as sampler.schedule=auto:paper): {text}")
    if text.startswith("{"):  # how to pass it back on a Hydra command line
        blocks = text.split("}")[0].replace(" ", "") + "}"
        print(f"  as a fixed schedule: sampler.schedule='{blocks}' sampler.tol={args.tol}")
    if args.json:
        atomic_write(args.json, json.dumps({"ranking": ranking_records(ranking),
                                            "schedule": schedule.to_dict()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
