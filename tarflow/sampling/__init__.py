"""Ring 1: sampling TarFlow (sequential, Jacobi, GS-Jacobi), CRM/IGM ranking, schedules."""

from tarflow.model.guidance import Guidance
from tarflow.sampling.convergence import relative_residual
from tarflow.sampling.denoise import self_denoise
from tarflow.sampling.jacobi import BlockStats, gs_jacobi_block
from tarflow.sampling.plan import (
    BlockPlan,
    Candidate,
    Plan,
    PlanCache,
    PrecisionNote,
    fingerprint,
    plan_key,
    ranking_moved,
)
from tarflow.sampling.planner import PlannerOptions, plan_schedule
from tarflow.sampling.ranking import (
    BlockRank,
    block_metrics,
    rank_blocks,
    ranking_table,
    schedule_from_ranking,
)
from tarflow.sampling.sample import (
    SampleStats,
    sample,
    sample_gs_jacobi,
    sample_jacobi,
    sample_sequential,
)
from tarflow.sampling.schedule import (
    SEQUENTIAL,
    BlockSchedule,
    SamplingSchedule,
    build_schedule,
    format_schedule,
    parse_schedule,
)
from tarflow.sampling.solve import solve_block

__all__ = [
    "SEQUENTIAL",
    "BlockPlan",
    "BlockRank",
    "BlockSchedule",
    "BlockStats",
    "Candidate",
    "Guidance",
    "Plan",
    "PlanCache",
    "PlannerOptions",
    "PrecisionNote",
    "SampleStats",
    "SamplingSchedule",
    "block_metrics",
    "build_schedule",
    "fingerprint",
    "format_schedule",
    "gs_jacobi_block",
    "parse_schedule",
    "plan_key",
    "plan_schedule",
    "rank_blocks",
    "ranking_moved",
    "ranking_table",
    "relative_residual",
    "sample",
    "sample_gs_jacobi",
    "sample_jacobi",
    "sample_sequential",
    "schedule_from_ranking",
    "self_denoise",
    "solve_block",
]
