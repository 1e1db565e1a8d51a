"""Benchmark of device selection: DP vs the exact MILP (HiGHS) on random device sets.

Not a test: prints one table. For I = 20, 100 and 1000 devices drawn like the paper's
(uniform in a 500 x 500 m UMi cell, Orin/Xavier, fp32/fp16/int8/int4, shadowing on), over
many seeds and two budget regimes — the paper's (T_max 2 s, E_max 200 J: 2-4 devices fit)
and a loose one (T_max 6 s, E_max 200 J: 6-10 fit) — it measures side by side in one run:
DP solve time, exact solve time, their ratio, the DP's worst and mean optimality gap, the
share of DP answers that are feasible, and the mean objective of the baselines relative to
the optimum. Run: `.venv/bin/python bench/selection.py [--quick]` (about a minute on 2 cores).

A second table (issue 23) does the same for chance-constrained selection (selection/
chance.py, P(latency <= T_max) >= 0.9 under the modelled stage distributions, energy at
its mean) on the same kind of cells with lossy links (20 ms one way, 1 % loss each way):
today's mean-based DP and the chance-constrained one timed side by side on the same
instances (ms, medians, and their ratio), the modelled probability that each plan keeps
T_max, and the chance DP's gap to the enumeration reference (`exact`, on the same draws;
I = 12). The stage distributions are computed once per instance, before the timing
(cached per link state; their time from cold is printed apart, `model ms`).

A third table (issue 23, the wiring) times the plan as a run makes it: today's (the cost
model and `select`) against `Multistage.plan` with its stage model (the chain's stage
distributions, the run's quantiles and p_within that result.json records), side by side
on the same instances: 20 devices drawn like the paper's on lossless links (the target:
no more than 2x today's time), and topologies/paper-radio.yaml (radio-derived delay and
loss on every link), mean-based and with P = 0.9, with fresh connections and after 8
runs, from a cold cache (a new process's first plan) and warm (the next one).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from pathlib import Path

from testbed.methods.base import PlanContext
from testbed.methods.multistage.strategy import Multistage
from testbed.model.radio import compute_links
from testbed.model.topology import load_topology, parse_topology, place
from testbed.selection import DEFAULT_GRID, device_costs, select, solvers
from testbed.selection.costs import planning_budgets
from testbed.selection.chance import latency_draws, p_within, select_chance
from testbed.selection.stochastic import clear_cache, stage_distributions

REGIMES = {"paper": (2.0, 200.0), "loose": (6.0, 200.0), "loose+rs": (6.0, 200.0)}
#: (I, regime, seeds). "+rs": every device gets its own random model size (300-3500 MB,
#: as a `sizes_mb` override would), so few devices tie and dominance pruning bites less.
#: The plain loose regime at I = 1000 takes HiGHS minutes per instance: left out.
PLAN = [
    (20, "paper", 40), (20, "loose", 40), (20, "loose+rs", 40),
    (100, "paper", 25), (100, "loose", 25), (100, "loose+rs", 25),
    (1000, "paper", 6), (1000, "loose+rs", 6),
]
EXACT_LIMIT_S = 20.0
#: chance-constrained rows: (I, T_max s, seeds); lossy links, E_max 200 J, P = 0.9
CHANCE_PLAN = [(12, 2.0, 20), (12, 3.0, 20), (20, 2.0, 20), (20, 3.0, 20), (20, 6.0, 10)]
CHANCE_LINKS = "links: {delay_ms: 20, loss_pct: 1}"
CONFIDENCE = 0.9


def instance(n_devices: int, seed: int, random_sizes: bool = False):
    topo = parse_topology(f"seed: {seed}\ndevices: {{count: {n_devices}}}\nradio: {{shadowing: true}}\n")
    links = compute_links(topo, place(topo))
    sizes = None
    if random_sizes:
        rng = np.random.default_rng(seed)
        sizes = {link.id: float(rng.uniform(300.0, 3500.0)) for link in links}
    return device_costs(topo, links, sizes_mb=sizes)


def run_row(n_devices: int, regime: str, seeds: int, grid: int) -> dict:
    t_max, e_max = REGIMES[regime]
    dp_ms, ex_ms, gaps, feasible, timeouts = [], [], [], 0, 0
    rel = {"random": [], "greedy": []}
    for seed in range(seeds):
        costs = instance(n_devices, 1000 + seed, regime.endswith("+rs"))
        t = np.array([c.latency_s for c in costs])
        e = np.array([c.energy_j for c in costs])
        v = np.array([c.size_mb for c in costs])
        got = select(costs, t_max, e_max, "dp", grid=grid)
        dp_ms.append(got.solve_ms)
        feasible += solvers.fits(got.latency_s, got.energy_j, t_max, e_max)
        start = time.perf_counter()
        try:
            opt_idx = solvers.exact(t, e, v, t_max, e_max, time_limit_s=EXACT_LIMIT_S)
        except TimeoutError:
            timeouts += 1
            continue
        ex_ms.append((time.perf_counter() - start) * 1e3)
        opt = float(v[opt_idx].sum())
        gaps.append(max(0.0, 1 - got.objective_mb / opt))
        for name in rel:
            rel[name].append(select(costs, t_max, e_max, name, seed=seed).objective_mb / opt)
    dp_med, ex_med = statistics.median(dp_ms), statistics.median(ex_ms) if ex_ms else float("nan")
    return {
        "I": n_devices,
        "regime": f"{regime} ({t_max:g} s, {e_max:g} J)",
        "seeds": seeds,
        "dp_ms": dp_med,
        "dp_max_ms": max(dp_ms),
        "exact_ms": ex_med,
        "ratio": ex_med / dp_med,
        "gap_max": max(gaps) * 100 if gaps else float("nan"),
        "gap_mean": statistics.fmean(gaps) * 100 if gaps else float("nan"),
        "feasible": feasible / seeds * 100,
        "random": statistics.fmean(rel["random"]) * 100 if rel["random"] else float("nan"),
        "greedy": statistics.fmean(rel["greedy"]) * 100 if rel["greedy"] else float("nan"),
        "timeouts": timeouts,
    }


def chance_row(n_devices: int, t_max: float, seeds: int, grid: int) -> dict:
    """Mean-based vs chance-constrained DP on lossy cells, side by side on the same instances."""
    e_max = 200.0
    dp_ms, ch_ms, model_ms, p_mean, p_chance, gaps, lost = [], [], [], [], [], [], []
    for seed in range(seeds):
        topo = parse_topology(f"seed: {1000 + seed}\ndevices: {{count: {n_devices}}}\nradio: {{shadowing: true}}\n"
                              f"{CHANCE_LINKS}\n")
        links = compute_links(topo, place(topo))
        costs = device_costs(topo, links)
        clear_cache()  # the model's time from cold (selection itself reuses it, cached per link state)
        start = time.perf_counter()
        stages = stage_distributions(topo, links, costs=costs)
        model_ms.append((time.perf_counter() - start) * 1e3)
        draws = latency_draws(stages)
        ids = [c.id for c in costs]
        mean_plan = select(costs, t_max, e_max, "dp", grid=grid)
        chance = select_chance(costs, stages, t_max, e_max, CONFIDENCE, grid=grid)
        dp_ms.append(mean_plan.solve_ms)
        ch_ms.append(chance.selection.solve_ms)
        p_mean.append(p_within(draws, [ids.index(i) for i in mean_plan.selected], t_max))
        p_chance.append(chance.p_within)
        lost.append(1 - chance.selection.objective_mb / mean_plan.objective_mb)
        if n_devices <= 16:
            ref = select_chance(costs, stages, t_max, e_max, CONFIDENCE, selector="exact")
            gaps.append(max(0.0, 1 - chance.selection.objective_mb / ref.selection.objective_mb))
    return {
        "I": n_devices, "t_max_s": t_max, "seeds": seeds,
        "dp_ms": statistics.median(dp_ms), "chance_ms": statistics.median(ch_ms),
        "ratio": statistics.median(ch_ms) / statistics.median(dp_ms), "chance_max_ms": max(ch_ms),
        "model_ms": statistics.median(model_ms),
        "p_mean_plan": statistics.fmean(p_mean), "p_mean_plan_min": min(p_mean),
        "p_chance_plan_min": min(p_chance), "size_given_up": statistics.fmean(lost) * 100,
        "gap_max": max(gaps) * 100 if gaps else float("nan"), "gap_mean": statistics.fmean(gaps) * 100 if gaps else float("nan"),
    }


RADIO = Path(__file__).resolve().parent.parent / "topologies/paper-radio.yaml"
#: plan rows: (label, instances, confidence, runs each connection carried before)
PLAN_ROWS = [("20 devices, lossless, 2 s", "paper", None, 0), ("paper-radio.yaml", "radio", None, 0),
             ("paper-radio.yaml", "radio", 0.9, 0), ("paper-radio.yaml", "radio", None, 8),
             ("paper-radio.yaml", "radio", 0.9, 8)]


def _today(topo, links, t_max: float, e_max: float):
    """The plan as it was: the cost model and the mean-based selection."""
    costs = device_costs(topo, links)
    return select(costs, *planning_budgets(topo, t_max, e_max), selector="dp", seed=topo.seed)


def _wired(topo, links, t_max: float, e_max: float, confidence, before: int):
    """The plan as a run makes it now, with what result.json reads from it."""
    ctx = PlanContext(topo, links, t_max, e_max, topo.seed, confidence=confidence,
                      messages_before={lk.id: before for lk in links}, delay_path="nfqueue+iptables")
    plan = Multistage("dp").plan(ctx)
    plan.to_json()
    for dev in plan.selected:
        plan.stage_predicted(dev), plan.stage_tail_s(dev)
    return plan


def plan_row(label: str, kind: str, confidence, before: int, seeds: int) -> dict:
    today, cold, warm = [], [], []
    for seed in range(seeds if kind == "paper" else 1):
        if kind == "paper":
            topo = parse_topology(f"seed: {1000 + seed}\ndevices: {{count: 20}}\nradio: {{shadowing: true}}\n")
        else:
            topo = load_topology(RADIO)
        links = compute_links(topo, place(topo))
        t_max, e_max = topo.budgets.t_max_s, topo.budgets.e_max_j
        for _ in range(5 if kind == "paper" else 3):  # best of a few: the host is shared
            start = time.perf_counter()
            _today(topo, links, t_max, e_max)
            today.append((time.perf_counter() - start) * 1e3)
            clear_cache()
            start = time.perf_counter()
            _wired(topo, links, t_max, e_max, confidence, before)
            cold.append((time.perf_counter() - start) * 1e3)
            start = time.perf_counter()
            _wired(topo, links, t_max, e_max, confidence, before)
            warm.append((time.perf_counter() - start) * 1e3)
    med = statistics.median
    return {"label": label, "confidence": confidence, "before": before, "instances": seeds if kind == "paper" else 1,
            "today_ms": med(today), "cold_ms": med(cold), "warm_ms": med(warm),
            "cold_ratio": med(cold) / med(today), "warm_ratio": med(warm) / med(today)}


def print_select(args) -> None:
    head = (
        f"{'I':>5} {'budgets':<25} {'seeds':>5} {'DP ms':>7} {'DP max':>7} {'exact ms':>9} {'exact/DP':>8} "
        f"{'gap max %':>9} {'gap mean %':>10} {'feasible %':>10} {'random %':>8} {'greedy %':>8}"
    )
    print(f"device selection, grid {args.grid} cells per budget; times are medians; random/greedy: "
          f"mean objective as % of the optimum")
    print(head)
    print("-" * len(head))
    for n_devices, regime, seeds in PLAN:
        seeds = max(2, seeds // 4) if args.quick else seeds
        r = run_row(n_devices, regime, seeds, args.grid)
        note = f"  ({r['timeouts']} exact runs over {EXACT_LIMIT_S:g} s left out)" if r["timeouts"] else ""
        print(
            f"{r['I']:>5} {r['regime']:<25} {r['seeds']:>5} {r['dp_ms']:>7.2f} {r['dp_max_ms']:>7.2f} "
            f"{r['exact_ms']:>9.2f} {r['ratio']:>8.1f} {r['gap_max']:>9.3f} {r['gap_mean']:>10.4f} "
            f"{r['feasible']:>10.0f} {r['random']:>8.1f} {r['greedy']:>8.1f}{note}",
            flush=True,
        )
    print()


def print_chance(args) -> None:
    head = (f"{'I':>5} {'T_max':>6} {'seeds':>5} {'DP ms':>7} {'P-DP ms':>8} {'ratio':>6} {'P-DP max':>8} "
            f"{'model ms':>9} {'P(mean plan)':>12} {'min':>5} {'P(P-DP) min':>11} {'size given up %':>15} "
            f"{'gap max %':>9} {'gap mean %':>10}")
    print(f"chance-constrained selection, P(latency <= T_max) >= {CONFIDENCE:g} (modelled), lossy links "
          f"({CHANCE_LINKS}), E_max 200 J; DP = today's mean-based DP, P-DP = chance-constrained, timed side by side "
          "(medians); gap: to the enumeration on the same draws")
    print(head)
    print("-" * len(head))
    for n_devices, t_max, seeds in CHANCE_PLAN:
        seeds = max(2, seeds // 4) if args.quick else seeds
        r = chance_row(n_devices, t_max, seeds, args.grid)
        print(f"{r['I']:>5} {r['t_max_s']:>5g}s {r['seeds']:>5} {r['dp_ms']:>7.2f} {r['chance_ms']:>8.2f} "
              f"{r['ratio']:>6.2f} {r['chance_max_ms']:>8.2f} {r['model_ms']:>9.0f} {r['p_mean_plan']:>12.2f} "
              f"{r['p_mean_plan_min']:>5.2f} {r['p_chance_plan_min']:>11.3f} {r['size_given_up']:>15.1f} "
              f"{r['gap_max']:>9.3f} {r['gap_mean']:>10.4f}", flush=True)
    print()


def print_plan(args) -> None:
    print("the plan as a run makes it: today's (cost model + select) vs Multistage.plan with its stage model "
          "(+ what result.json reads: quantiles, p_within, per-stage predictions and deadline tails); medians, "
          "side by side; cold: the transfer cache cleared first")
    head = (f"{'plan':<28} {'P':>4} {'runs before':>11} {'inst':>4} {'today ms':>9} {'wired cold ms':>13} "
            f"{'x today':>7} {'wired warm ms':>13} {'x today':>7}")
    print(head)
    print("-" * len(head))
    for label, kind, confidence, before in PLAN_ROWS:
        r = plan_row(label, kind, confidence, before, 5 if args.quick else 20)
        print(f"{r['label']:<28} {'-' if confidence is None else f'{confidence:g}':>4} {before:>11} "
              f"{r['instances']:>4} {r['today_ms']:>9.2f} {r['cold_ms']:>13.2f} {r['cold_ratio']:>7.2f} "
              f"{r['warm_ms']:>13.2f} {r['warm_ratio']:>7.2f}", flush=True)
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=int, default=DEFAULT_GRID, help="DP cells per budget")
    ap.add_argument("--quick", action="store_true", help="a quarter of the seeds")
    ap.add_argument("--only", default="select,chance,plan", help="tables to print: select, chance, plan")
    args = ap.parse_args()
    start = time.perf_counter()
    for part, show in (("select", print_select), ("chance", print_chance), ("plan", print_plan)):
        if part in args.only.split(","):
            show(args)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
