"""The sampling planner: choose, per block, the fastest way to solve it on this device and batch.

Blocks are solved one after another, so a sampling call costs the sum of its blocks' costs and
each block can be decided on its own. For every block the planner times a few candidates on a
probe batch *of the size that will be sampled*, on the device and in the dtype that will be used,
and keeps the fastest:

- the sequential loop (always a candidate, so a plan is never slower than sequential, up to
  timing noise);
- Jacobi (one segment) from the initial guess the IGM prefers;
- for the blocks the CRM ranking marks tough (the paper's rule, the prior), GS-Jacobi with 2, 4,
  8 ... segments, tried upwards from Jacobi while more segments keep getting faster (cost is
  close to unimodal in S: few segments waste passes on unconverged tails, many pay a pass per
  segment even where one would do);
- Jacobi also without freezing (whole causal passes and no K/V cache instead of the frontier;
  tried on the first block sampled, the faster variant kept for the rest);
- with a distilled student (``student``): Jacobi from the student's guess (its sample pushed
  through the teacher's forward pass gives every block's input, ``init="student"``), and the GS
  walk from that guess where it beat the input-made one. Computing the guess is one student call
  and one teacher forward pass per sampling call, paid once for every block that uses it: it is
  timed on each probe round and a plan keeps the student only where its blocks' savings exceed
  that cost (``Plan.guess_seconds``); otherwise the best plan without it is kept;
- each Jacobi structure also with a low-precision network where the caller allows one and a
  short probe of single network passes shows it is faster at that segment length. A plan that
  runs one is kept only if it moves the probe samples from the same plan's in full precision
  by at most max(tol, that full-precision plan's distance from the sequential loop), both in
  the stopping test's metric: bf16 may cost no more accuracy than the tolerance already does
  (tol alone fails wherever the flow amplifies the per-block tolerance: 0.1-0.26 for the worst
  sample of a half-trained demo model). Otherwise the blocks are planned again in full
  precision. ``Plan.precision`` records the decision, its measurements and its reason.

All candidates stop at the same tolerance, so they are equally accurate. Each block is fed the
output of the previous block's fastest candidate (what it will see when sampling). Later probe
rounds use other noise and re-time only the close calls (within ``keep`` of the best); a third
round runs only for blocks where two rounds disagree, and a candidate's cost is its median over
rounds, so a choice rests neither on one lucky draw nor on one stall of the machine (stalls only
ever make a run slower). The garbage collector is paused while planning.

Cost control. Candidates of a block run best guess first: the previous block's winner, then
Jacobi, then the sequential loop, then more segments. A candidate still running after ``margin``
times the best time so far is stopped (through the solver's per-iteration callback), so a
losing candidate costs at most ``margin`` x the winner. A plan therefore costs about (number of
candidates per block + the re-timed rounds) x one sampling call: 3-7 calls on the demo model
(``Plan.summary`` states it; docs/benchmarks.md lists measured values). Plans are cached
(``tarflow.sampling.plan.PlanCache``), so this is paid once per model, device and batch.

How often to test convergence (``check_every``) follows from the same measurements: a test costs
``t_test`` (a few small kernels and a host read, timed on tensors of the block's shape) and
saves, against testing every k-th iteration, about ``(k - 1) / 2`` network passes of overshoot
per segment; the best k is about sqrt(2 I t_test / t_pass) for I iterations per segment.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from tarflow.model import Guidance, TarFlow
from tarflow.model.student import Student
from tarflow.sampling.plan import BlockPlan, Candidate, Plan, PlannerOptions, PrecisionNote
from tarflow.sampling.precision import dtype_name, network_copy
from tarflow.sampling.ranking import BlockRank
from tarflow.sampling.sample import _sync, precision_errors
from tarflow.sampling.sample_set import fixed_inputs
from tarflow.sampling.schedule import (
    SEQUENTIAL,
    BlockSchedule,
    SamplingSchedule,
    format_block,
)
from tarflow.sampling.student import student_guesses
from tarflow.sampling.timing import pass_seconds, time_candidate, with_test_interval

# timer(block, candidate, measured seconds) -> seconds to use. Tests inject costs through it.
Timer = Callable[[int, BlockSchedule, float], float]


@torch.no_grad()
def plan_schedule(model: TarFlow, ranking: list[BlockRank] | None, *, batch_size: int,
                  tol: float, guidance: Guidance = Guidance(), net_dtypes: tuple[str, ...] = (),
                  precision_gate: bool = True, seed: int = 0,
                  options: PlannerOptions = PlannerOptions(), timer: Timer | None = None,
                  student: Student | None = None, student_steps: int | None = None) -> Plan:
    """Measure and return the fastest per-block schedule for this model, device and batch.

    Args:
        model: the model, in eval mode, on the device and in the dtype that will sample.
        ranking: CRM/IGM rows (``rank_blocks``): which blocks are tough, which initial guess
            each prefers. None treats every block as tough, with the guess "z".
        batch_size: the sampling batch (timing depends on it).
        tol: stopping tolerance of every Jacobi candidate (the plan's accuracy).
        guidance: the guidance that will be used (it doubles the network batch).
        net_dtypes: low-precision network dtypes the planner may consider (e.g. ("bfloat16",)).
        precision_gate: keep a plan that runs a low-precision network only if its samples on
            the probe noise stay within max(tol, the full-precision plan's error) of the same
            plan in full precision (see the module docstring; else plan again without it).
            False: the caller forces the dtype; the errors are still measured.
        seed: seed of the probe noise and labels.
        options: search knobs (:class:`PlannerOptions`).
        timer: replaces each measured time (tests inject costs); it also disables stopping
            over-budget candidates, which relies on the wall clock.
        student: a distilled student of ``model``: its guess (``init="student"``) becomes a
            candidate of every block, its cost counted once per call (see the module
            docstring). ``student_steps``: its Euler steps K (None: its own).

    Returns:
        A :class:`Plan` (schedule, per-block candidates and costs, planning time, and the
        low-precision decision in ``plan.precision``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    guidance.check(model.config.conditional)
    t_start = time.perf_counter()
    learned = (student, student_steps)
    planner = _Planner(model, ranking, batch_size, tol, guidance, net_dtypes, seed, options,
                       timer, learned)
    plan = planner.run()
    note = planner.precision_note(plan, net_dtypes)
    note.gate = precision_gate
    if note.blocks:  # the fastest plan runs a low-precision network: how far off are samples?
        noise, y = planner.inputs(0)
        note.error, note.full_error = precision_errors(model, noise, y, plan.schedule, guidance,
                                                       student=student, steps=student_steps)
        note.bound = max(tol, note.full_error)
        within = note.error <= note.bound
        if precision_gate and not within:
            note.reason = (f"too inaccurate (sample error {note.error:.1e} > bound "
                           f"{note.bound:.1e}): planned again in full precision")
            plan = _Planner(model, ranking, batch_size, tol, guidance, (), seed, options,
                            timer, learned).run()
        else:
            note.kept = True
            note.reason = ("faster, and the samples within bound" if precision_gate
                           else "forced by net_dtype (accuracy measured, not enforced"
                           + ("" if within else ": ABOVE the bound") + ")")
    plan.precision = note
    plan.planning_seconds = time.perf_counter() - t_start
    return plan


class _Planner:
    """State of one planning run; see :func:`plan_schedule` and the module docstring."""

    def __init__(self, model: TarFlow, ranking: list[BlockRank] | None, batch_size: int,
                 tol: float, guidance: Guidance, net_dtypes: tuple[str, ...], seed: int,
                 options: PlannerOptions, timer: Timer | None,
                 learned: tuple[Student | None, int | None] = (None, None)) -> None:
        self.t_start = time.perf_counter()
        self.model, self.ranking, self.batch = model, ranking, batch_size
        self.tol, self.guidance, self.seed, self.opt, self.timer = (tol, guidance, seed,
                                                                    options, timer)
        self.N, self.T = model.config.num_patches, model.config.num_blocks
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.low = tuple(d for d in dict.fromkeys(dtype_name(d) for d in net_dtypes)
                         if d is not None and d != dtype_name(self.dtype))
        # Converted copies exist before anything is timed (a conversion is not a pass).
        self.nets = {d: network_copy(model, getattr(torch, d)) for d in self.low}
        self.table: dict[int, dict[str, Candidate]] = {b: {} for b in range(self.T)}
        self.settings: dict[int, dict[str, BlockSchedule]] = {b: {} for b in range(self.T)}
        self.pass_cost: dict[tuple[str | None, str], float] = {}
        self.freeze_pref: bool | None = None  # Jacobi with freezing beat without, on block T-1
        self.timed_low: set[str] = set()  # low dtypes some candidate was timed in
        self.student, self.student_steps = learned
        self.guesses: dict[int, torch.Tensor] = {}  # the student's guess per block, this round
        self.guess_seconds: list[float] = []  # what computing them cost, per round

    # ------------------------------------------------------------------------- the search
    def run(self) -> Plan:
        # Collector pauses land on whichever candidate runs then: pause it, as timeit does.
        # (No full collection first: in a process holding a training run it takes longer
        # than the whole plan.)
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self.search()
        finally:
            if enabled:
                gc.enable()

    def search(self) -> Plan:
        noise, y = self.inputs(0)
        self.pass_cost = pass_seconds(self.model, self.nets, noise, y, self.guidance)
        self.make_guesses(noise, y, warm_up=True)
        ranks = {r.block: r for r in self.ranking or []}
        alive: dict[int, list[str]] | None = None  # None: round 0 tries every candidate
        winner: BlockSchedule | None = None
        firsts: dict[int, list[str]] = {b: [] for b in range(self.T)}  # each round's fastest
        for r in range(self.opt.rounds):
            if alive is not None:
                alive = {b: self.close(b, labels) for b, labels in alive.items()}
                if all(len(labels) == 1 for labels in alive.values()):
                    break  # no close calls left to settle
                if r >= 2 and all(self.settled(b, labels, firsts[b])
                                  for b, labels in alive.items()):
                    break  # two rounds on different noise agree, or it is a tie
                noise, y = self.inputs(r)
                self.make_guesses(noise, y)
            x = noise
            for block in reversed(self.model.blocks):
                b = block.index
                rank = ranks.get(b)
                base = BlockSchedule(1, None, rank.best_init if rank else "z", self.tol)
                if block.is_identity:  # 0 layers: nothing to solve, sampling skips it
                    self.settings[b]["identity"] = base
                    self.table[b].setdefault("identity", Candidate("identity")).seconds.append(0)
                    firsts[b].append("identity")
                    continue
                self.best, self.best_out, self.best_cand = math.inf, None, None
                if alive is not None:  # later rounds: the close calls only, best first
                    for label in alive[b]:
                        self.try_candidate(block, x, y, self.settings[b][label])
                else:
                    tough = rank is None or rank.share >= (self.opt.tough_factor * 100.0
                                                           / self.T)
                    for cand in self.first_candidates(base, winner, tough):
                        self.try_candidate(block, x, y, cand)
                    if self.freeze_pref is None:
                        self.freeze_pref = self.faster_freeze(b, base)
                    if tough:
                        self.walk_segments(block, x, y, base)
                winner, x = self.best_cand, self.best_out
                firsts[b].append(self.label(winner))
            if alive is None:
                alive = {b: list(self.table[b]) for b in range(self.T)}
        choice = {b: self.close(b, labels)[0] for b, labels in alive.items()}
        return self.plan(self.worth_the_guess(choice), noise)

    def inputs(self, r: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Probe noise and labels of round ``r``: members ``r * B .. (r + 1) * B - 1`` of the
        fixed sample set of seed ``seed`` (:func:`fixed_inputs`, the source every sampling
        command draws from; other members every round)."""
        members = range(r * self.batch, (r + 1) * self.batch)
        noise, y = fixed_inputs(self.model, members, self.seed)
        return noise.to(self.device, self.dtype), None if y is None else y.to(self.device)

    def make_guesses(self, noise: torch.Tensor, y, *, warm_up: bool = False) -> None:
        """The student's guess of every block for this round's noise, and its cost (the first
        call of a process warms up kernels: not timed)."""
        if self.student is None:
            return
        for _ in range(2 if warm_up else 1):
            _sync(noise.device)
            t0 = time.perf_counter()
            self.guesses = student_guesses(self.model, self.student, noise, y, self.guidance,
                                           steps=self.student_steps)
            _sync(noise.device)
        self.guess_seconds.append(time.perf_counter() - t0)

    def uses_guess(self, label: str, b: int) -> bool:
        return self.settings[b][label].init == "student"

    def worth_the_guess(self, choice: dict[int, str]) -> dict[int, str]:
        """``choice``, or the best choice without the student's guess where the blocks that
        use it save less than computing it costs. Without the guess, each such block takes
        its fastest other candidate (a stopped one counts at its lower bound, which favours
        dropping the guess)."""
        if not any(self.uses_guess(lb, b) for b, lb in choice.items()):
            return choice
        cost = self.table
        without = {b: lb if not self.uses_guess(lb, b) else
                   min((o for o in cost[b] if not self.uses_guess(o, b)),
                       key=lambda o: cost[b][o].cost) for b, lb in choice.items()}
        saved = sum(cost[b][without[b]].cost - cost[b][lb].cost for b, lb in choice.items())
        return choice if saved > self.guess_cost else without

    @property
    def guess_cost(self) -> float:
        """Median seconds of computing the student's guesses once (0: no student)."""
        return statistics.median(self.guess_seconds) if self.guess_seconds else 0.0

    def try_candidate(self, block, x: torch.Tensor, y, cand: BlockSchedule) -> None:
        """Time one candidate (stopped past ``margin`` x the best so far) and record it."""
        b, label = block.index, self.label(cand)
        self.settings[b][label] = cand
        entry = self.table[b].setdefault(label, Candidate(label))
        budget = (None if self.timer is not None or math.isinf(self.best)
                  else self.opt.margin * self.best)
        if cand.net_dtype in self.nets:
            self.timed_low.add(cand.net_dtype)
        guess = self.guesses.get(b) if cand.init == "student" else None
        seconds, out, iters = time_candidate(block, x, y, cand, self.guidance, self.nets,
                                             budget, guess)
        if self.timer is not None:
            seconds = self.timer(b, cand, seconds)
        entry.seconds.append(seconds)
        if out is None:
            entry.aborted += 1
            return
        entry.iters = iters
        if seconds < self.best:
            self.best, self.best_out, self.best_cand = seconds, out, cand

    def first_candidates(self, base: BlockSchedule, winner: BlockSchedule | None,
                         tough: bool) -> list[BlockSchedule]:
        """Jacobi in each worthwhile dtype and the sequential loop, likeliest winner first (it
        sets a tight budget for the rest): the previous block's winning kind, or for the first
        block the cheaper by a prior estimate from the pass probe, N - 1 single-token steps
        against 8 (tough block) or 4 full passes.

        Jacobi comes with and without freezing (the frontier and a K/V cache, or whole causal
        passes without one) on the first block; later blocks get the variant that was faster
        there (``freeze_pref``): which pays is a matter of pass cost, the same in every block.
        """
        freezes = (True, False) if self.freeze_pref is None else (self.freeze_pref,)
        inits = (base.init, "student") if self.student is not None else (base.init,)
        order = [replace(base, net_dtype=d, freeze=f, init=i) for i in inits
                 for d in self.dtypes_for(1) for f in freezes]
        seq = BlockSchedule(SEQUENTIAL, None, "z", self.tol)  # no guess, no network copy
        order.append(seq)
        if winner is not None:
            guess = seq if winner.segments == SEQUENTIAL else replace(
                base, net_dtype=winner.net_dtype, freeze=freezes[0], init=winner.init)
        else:
            steps = (self.N - 1) * self.pass_cost[(None, "one")]
            passes = (8 if tough else 4) * self.pass_cost[(None, "long")]
            guess = seq if steps < passes else order[0]
        if guess in order:
            order.remove(guess)
            order.insert(0, guess)
        return order

    def faster_freeze(self, b: int, base: BlockSchedule) -> bool:
        """Whether Jacobi with freezing was faster than without on block ``b`` (ties and
        stopped runs: with, the default)."""
        d = self.dtypes_for(1)[0]
        with_, without = (self.table[b].get(self.label(replace(base, net_dtype=d, freeze=f)))
                          for f in (True, False))
        if without is None or not without.complete:
            return True
        if with_ is None or not with_.complete:
            return False
        return with_.cost <= without.cost

    def walk_segments(self, block, x: torch.Tensor, y, base: BlockSchedule) -> None:
        """More segments, upwards from Jacobi, per dtype, while each step is faster; from the
        student's guess where Jacobi from it beat Jacobi from ``base.init``."""
        entries = self.table[block.index]
        if self.student is not None:
            d, f = self.dtypes_for(1)[0], self.freeze_pref is not False
            own, learned = (entries.get(self.label(replace(base, net_dtype=d, init=i, freeze=f)))
                            for i in (base.init, "student"))
            if learned is not None and learned.complete and (
                    own is None or not own.complete or learned.cost < own.cost):
                base = replace(base, init="student")
        for d in dict.fromkeys(self.dtypes_for(2) + self.dtypes_for(8)):
            prev = entries.get(self.label(replace(base, net_dtype=d)))
            for S in (s for s in self.opt.segments if 1 < s <= self.N // 2):
                if d not in self.dtypes_for(S):
                    continue
                cand = replace(base, segments=S, net_dtype=d)
                self.try_candidate(block, x, y, cand)
                now = entries[self.label(cand)]
                if not now.complete or (prev is not None and now.cost >= prev.cost):
                    break
                prev = now

    def dtypes_for(self, S: int) -> list[str | None]:
        """Network dtypes worth timing for segments of about N/S tokens: every low dtype whose
        pass there is faster by ``dtype_gain``, and full precision unless one is faster by 25%
        or more (then full precision cannot win: the iterations are the same)."""
        length = "long" if S <= 2 else "short"
        ref = self.pass_cost[(None, length)]
        ratio = {d: self.pass_cost[(d, length)] / ref for d in self.low}
        faster = [d for d in self.low if ratio[d] <= self.opt.dtype_gain]
        clearly = any(ratio[d] <= 0.75 for d in faster)
        return ([] if clearly else [None]) + faster

    def close(self, b: int, labels: list[str]) -> list[str]:
        """Candidates whose median is within ``keep`` of the best, best first. One stopped
        only now and then stays in (a stall of the machine may have stopped it); the best must
        have finished a run."""
        entries = self.table[b]
        ran = sorted((lb for lb in labels if entries[lb].aborted < len(entries[lb].seconds)),
                     key=lambda lb: entries[lb].cost)
        best = entries[ran[0]].cost
        return [lb for lb in sorted(labels, key=lambda lb: entries[lb].cost)
                if entries[lb].cost <= self.opt.keep * best and
                (lb == ran[0] or entries[lb].aborted <= len(entries[lb].seconds) // 2)]

    def settled(self, b: int, labels: list[str], firsts: list[str]) -> bool:
        """Whether a block needs no further round: one candidate left, the last two rounds'
        fastest agree, or the two best medians are within 3% (either choice is as good)."""
        if len(labels) < 2 or firsts[-1] == firsts[-2]:
            return True
        a, b2 = (self.table[b][lb].cost for lb in labels[:2])
        return b2 <= 1.03 * a

    def label(self, cand: BlockSchedule) -> str:
        return format_block(cand, self.tol)

    # ------------------------------------------------------------------------- the result
    def precision_note(self, plan: Plan, asked: tuple[str, ...]) -> PrecisionNote:
        """What this run did with the low-precision dtypes ``asked`` for (before the
        accuracy check of :func:`plan_schedule`)."""
        names = list(dict.fromkeys(n for n in map(dtype_name, asked) if n is not None))
        note = PrecisionNote(names, tol=self.tol)
        if not names:
            note.reason = "not allowed by net_dtype"
            return note
        if not self.low:
            note.reason = f"the model already runs in {dtype_name(self.dtype)}"
            return note
        note.considered = True
        note.pass_ratio = {d: {f: self.pass_cost[(d, f)] / self.pass_cost[(None, f)]
                               for f in ("long", "short")} for d in self.low}
        N = self.N
        note.blocks = sorted((bp.block for bp in plan.blocks if bp.choice != "identity"
                              and not plan.schedule.for_block(bp.block).is_sequential(N)
                              and plan.schedule.for_block(bp.block).net_dtype in self.low),
                             reverse=True)
        if not self.timed_low:
            note.reason = (f"a pass is not faster on this device (needs <= "
                           f"{self.opt.dtype_gain:.2f}x of full precision): plan stays in "
                           f"{dtype_name(self.dtype)}")
        elif not note.blocks:
            note.reason = (f"timed, but no block was faster with it: plan stays in "
                           f"{dtype_name(self.dtype)}")
        return note

    def plan(self, choice: dict[int, str], noise: torch.Tensor) -> Plan:
        chosen = {b: self.settings[b][label] for b, label in choice.items()}
        guessed = any(s.init == "student" for s in chosen.values())
        guess_seconds = self.guess_cost if guessed else 0.0
        predicted = sum(self.table[b][label].cost for b, label in choice.items()) + guess_seconds
        chosen = with_test_interval(chosen, {b: self.table[b][lb] for b, lb in choice.items()},
                                    noise, self.tol, self.opt.max_check_every)
        blocks = [BlockPlan(b, "identity" if choice[b] == "identity" else self.label(chosen[b]),
                            list(self.table[b].values())) for b in range(self.T)]
        seq = [self.table[b].get("seq") for b in range(self.T) if "identity" not in self.table[b]]
        return Plan(_as_schedule(chosen), blocks, predicted,
                    sum(c.cost for c in seq if c is not None),
                    all(c is not None and c.complete for c in seq),
                    planning_seconds=time.perf_counter() - self.t_start,
                    shares={r.block: r.share for r in self.ranking} if self.ranking else None,
                    guess_seconds=guess_seconds,
                    guess_timed=self.guess_cost if self.student is not None else None)


def _as_schedule(chosen: dict[int, BlockSchedule]) -> SamplingSchedule:
    """Per-block choices as a schedule whose default is the most common choice."""
    settings = list(chosen.values())
    default = max(settings, key=settings.count)
    return SamplingSchedule({b: s for b, s in chosen.items() if s != default}, default)
