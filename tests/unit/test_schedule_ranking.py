"""Schedules (paper notation, explicit settings) and the CRM/IGM ranking."""

from __future__ import annotations

import pytest
import torch

from tarflow.sampling import (
    SEQUENTIAL,
    BlockSchedule,
    SamplingSchedule,
    build_schedule,
    format_schedule,
    parse_schedule,
    rank_blocks,
    ranking_table,
    schedule_from_ranking,
)
from tarflow.sampling.ranking import matrix_norm
from tests.unit.conftest import make_model

PUBLISHED = {
    "[7-8-32-10]": ({7: (8, 32)}, 10),  # AFHQ
    "[6-8-32-10]": ({6: (8, 32)}, 10),  # Img128cond
    "[0/6-8-32-20]": ({0: (8, 32), 6: (8, 32)}, 20),  # Img64uncond
    "[0/7-256/8-1/13-6]": ({0: (256, 1), 7: (8, 13)}, 6),  # Img64cond
}


@pytest.mark.parametrize("text", PUBLISHED)
def test_published_strategies_parse_to_forward_block_ids(text):
    blocks, other = PUBLISHED[text]
    s = parse_schedule(text, tol=1e-3)
    assert {b: (v.segments, v.max_iters) for b, v in s.blocks.items()} == blocks
    assert (s.default.segments, s.default.max_iters) == (1, other)
    assert s.for_block(3) == s.default and s.for_block(3).tol == 1e-3
    assert format_schedule(s) == text
    assert parse_schedule(format_schedule(s), tol=1e-3) == s


def test_sequential_jacobi_and_dict_forms():
    assert SamplingSchedule.sequential().for_block(4).is_sequential(64)
    assert BlockSchedule(256).is_sequential(256) and not BlockSchedule(8).is_sequential(256)
    assert BlockSchedule(SEQUENTIAL).boundaries(4) == [0, 1, 2, 3, 4]
    assert BlockSchedule(3).boundaries(8) == [0, 2, 5, 8]
    assert parse_schedule("jacobi:5").default.max_iters == 5
    explicit = {"default": {"max_iters": 6}, "blocks": {"0": {"segments": 4, "init": "zeros"}}}
    s = build_schedule(explicit, tol=1e-4)
    assert s.for_block(0) == BlockSchedule(4, 6, "zeros", 1e-4)
    assert s.for_block(1) == BlockSchedule(1, 6, "z", 1e-4)
    assert SamplingSchedule.from_dict(s.to_dict()) == s


@pytest.mark.parametrize("bad, match", [
    ("[7-8-32]", "cannot parse"), ("[0/7-8/8/8-1-6]", "GS has 3 values"), ("auto", "ranking"),
])
def test_bad_schedule_text(bad, match):
    with pytest.raises(ValueError, match=match):
        build_schedule(bad)


def test_schedule_validation_against_model():
    with pytest.raises(ValueError, match=r"block\(s\) \[7\]"):
        parse_schedule("[7-8-32-10]").validate(num_blocks=4, num_patches=64)
    with pytest.raises(ValueError, match="only N=16"):
        SamplingSchedule(default=BlockSchedule(32)).validate(2, 16)
    with pytest.raises(ValueError, match="tol"):
        BlockSchedule(tol=-1e-3)
    with pytest.raises(ValueError, match="init"):
        BlockSchedule(init="noise")


def _scaled_model(tough: int):
    model = make_model(0, num_blocks=4, dtype=torch.float32, std=0.02)
    with torch.no_grad():
        model.blocks[tough].proj_out.weight.mul_(15.0)
    return model


@pytest.mark.parametrize("tough", [0, 2])
def test_scaled_block_ranks_first_and_gets_segmented(tough):
    model = _scaled_model(tough)
    images = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ranking = rank_blocks(model, images)
    assert [r.block for r in ranking] == [0, 1, 2, 3]
    assert max(ranking, key=lambda r: r.crm).block == tough
    assert abs(sum(r.share for r in ranking) - 100.0) < 1e-6
    assert all(set(r.igm) == {"z", "zeros"} for r in ranking)
    again = rank_blocks(model, images)
    assert [r.crm for r in again] == [r.crm for r in ranking]  # deterministic
    schedule = schedule_from_ranking(ranking, model.config.num_patches, tough_segments=4)
    assert schedule.for_block(tough).segments == 4
    assert all(schedule.for_block(b).segments == 1 for b in range(4) if b != tough)
    assert all(schedule.for_block(r.block).init == r.best_init for r in ranking)
    table = ranking_table(ranking, schedule)
    assert len(table.splitlines()) == 5 and "IGM_zeros" in table


def test_norm_choices():
    m = torch.tensor([[3.0, 0.0], [0.0, -4.0]])
    assert matrix_norm(m, "spectral") == pytest.approx(4.0)
    assert matrix_norm(m, "1") == pytest.approx(4.0)
    assert matrix_norm(m, "fro") == pytest.approx(5.0)
    assert matrix_norm(torch.tensor([[float("inf")]])) == float("inf")
    with pytest.raises(ValueError):
        matrix_norm(m, "nuc")
