"""`latentforge bench samplers`: sampler accuracy and overhead against the exact ODE solution.

Every run starts from the same state x_T at Stable Diffusion's sigma_max (the scaled_linear
1000-step schedule, sigma 14.6146 .. 0.0292) and is compared with the exact probability-flow
ODE solution at sigma = 0 of the same x_T (`analytic.ode_solution`, rtol 1e-10), on a 2-D and
a 64-D Gaussian mixture drawn from `--seed`. x_T = z sqrt(1 + sigma_max^2) for unit noise z:
diffusers' convention (init_noise_sigma), the same point for every implementation.

NFE = denoiser calls, counted. Samplers with 2 calls per step (heun, dpm2, dpmpp_2s) get
(NFE + 1) // 2 steps, i.e. 2 * steps - 1 <= NFE calls (their last step, to sigma 0, is one
call). diffusers' schedulers see the same oracle wrapped as an eps-prediction model on the
discrete SD schedule (timestep -> sigma by log-linear interpolation, as its Euler/Heun do);
each is run with linspace, trailing and (where offered) Karras sigmas.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import analytic, sampling, schedules

DEFAULT_SEED = 0
FIT_SEEDS = (1000, 1001, 1002, 1003, 1004, 1005)  # the optimized schedule is fitted on these
UNSEEN_SEEDS = (2000, 2001, 2002, 2003, 2004)  # ... and checked on these (and DEFAULT_SEED)
NFES = (5, 10, 20, 50)
DIMS = {2: 1024, 64: 256}  # dimension -> draws (enough that a few mode flips do not dominate)
COMPONENTS = 8

# (label, sampler, knobs, denoiser calls per step)
LF_RUNS: tuple[tuple[str, str, dict, int], ...] = (
    ("euler", "euler", {}, 1),
    ("ddim", "ddim", {}, 1),
    ("heun", "heun", {}, 2),
    ("dpm2", "dpm2", {}, 2),
    ("lms", "lms", {}, 1),
    ("ipndm", "ipndm", {}, 1),
    ("dpmpp_2m", "dpmpp_2m", {}, 1),
    ("dpmpp_3m(eta=0)", "dpmpp_3m_sde", {"eta": 0.0}, 1),
    ("dpmpp_2s(eta=0)", "dpmpp_2s_ancestral", {"eta": 0.0}, 2),
    ("unipc(bh1)", "unipc", {"variant": "bh1"}, 1),
    ("unipc(bh2)", "unipc", {"variant": "bh2"}, 1),
    ("unipc(order=3)", "unipc", {"order": 3}, 1),
)
LF_SPACINGS = (
    "karras",
    "exponential",
    "polyexponential",
    "vp",
    "optimized",
    "linspace",
    "trailing",
)
# The samplers the optimized schedule is fitted for, and reported on.
FIT_SAMPLERS = ("dpmpp_2m", "unipc(bh2)")


def sd_train_sigmas() -> torch.Tensor:
    """SD 1.x/2.x's discrete schedule (scaled_linear, 1000 steps) as sigmas, increasing."""
    betas = schedules.get_betas("scaled_linear", 1000)
    return schedules.alpha_bar_to_sigma(schedules.alphas_cumprod(betas))


@dataclass
class Problem:
    dim: int
    seed: int
    oracle: analytic.GaussianMixture
    x_T: torch.Tensor  # (draws, dim) float64, at sigma_max
    exact: torch.Tensor  # (draws, dim) float64, the ODE solution at sigma 0


def make_problem(dim: int, seed: int, draws: int | None = None) -> Problem:
    """The mixture of `seed`, draws of unit noise from seed + 1, and their exact solutions."""
    train = sd_train_sigmas()
    sigma_min, sigma_max = float(train[0]), float(train[-1])
    oracle = analytic.random_mixture(
        dim, COMPONENTS, seed, sigma_min=sigma_min, sigma_max=sigma_max
    )
    g = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(draws or DIMS[dim], dim, generator=g, dtype=torch.float64)
    x_T = z * math.sqrt(1 + sigma_max**2)
    return Problem(dim, seed, oracle, x_T, analytic.ode_solution(oracle, x_T, sigma_max))


class _Counted:
    """The oracle with a call counter (NFE) and the denoiser contract's attributes."""

    def __init__(self, oracle):
        self.oracle, self.calls = oracle, 0
        self.sigma_min, self.sigma_max = oracle.sigma_min, oracle.sigma_max

    def prior_scale(self, sigma: float) -> float:
        return sigma

    def __call__(self, x, sigma, **cond):
        self.calls += 1
        return self.oracle(x, sigma)


def lf_steps(nfe: int, calls_per_step: int) -> int:
    return nfe if calls_per_step == 1 else (nfe + 1) // 2


def lf_sigmas(spacing: str, steps: int, knots=None) -> torch.Tensor:
    train = sd_train_sigmas()
    if spacing == "optimized" and knots is not None:
        return schedules.get_sigmas_optimized(steps, float(train[0]), float(train[-1]), knots)
    return schedules.get_sigmas(
        spacing, steps, sigma_min=float(train[0]), sigma_max=float(train[-1]), train_sigmas=train
    )


def run_lf(problem: Problem, run, spacing: str, nfe: int, knots=None) -> tuple[float, int]:
    """(RMS error vs the exact solution, denoiser calls) of one latentforge run, float32."""
    _, name, knobs, per_step = run
    den = _Counted(problem.oracle)
    sigmas = lf_sigmas(spacing, lf_steps(nfe, per_step), knots)
    out = sampling.sample(name, den, problem.x_T.float(), sigmas, **knobs)
    return _rms(out, problem.exact), den.calls


def _rms(out: torch.Tensor, exact: torch.Tensor) -> float:
    return float((out.double() - exact).pow(2).mean().sqrt())


# ----- diffusers, side by side -------------------------------------------------------------------
def diffusers_runs() -> list[tuple[str, Callable, int, bool]]:
    """(label, scheduler factory(**spacing kwargs), calls per step, offers Karras sigmas)."""
    import diffusers

    sd = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    sd["num_train_timesteps"] = 1000

    def make(cls, **kw):
        return lambda **spacing: cls(**sd, **kw, **spacing)

    dpm, last = diffusers.DPMSolverMultistepScheduler, {"final_sigmas_type": "zero"}
    return [
        ("DDIM", make(diffusers.DDIMScheduler, set_alpha_to_one=True, clip_sample=False), 1, False),
        ("Euler", make(diffusers.EulerDiscreteScheduler), 1, True),
        ("Heun", make(diffusers.HeunDiscreteScheduler), 2, True),
        ("DPM++2M", make(dpm, solver_order=2, **last), 1, True),
        ("DPM++3M", make(dpm, solver_order=3, **last), 1, True),
        ("UniPC", make(diffusers.UniPCMultistepScheduler, **last), 1, True),  # bh2, order 2
    ]


def _diffusers_spacings(offers_karras: bool) -> dict[str, dict]:
    out = {
        "linspace": {"timestep_spacing": "linspace"},
        "trailing": {"timestep_spacing": "trailing"},
    }
    if offers_karras:
        out["karras"] = {"timestep_spacing": "linspace", "use_karras_sigmas": True}
    return out


class _EpsModel:
    """The oracle as an eps-prediction network on SD's discrete schedule: input x_t in VP form
    (diffusers' scale_model_input already applied), fractional timestep -> sigma log-linearly."""

    def __init__(self, oracle):
        self.oracle, self.calls, self.train = oracle, 0, sd_train_sigmas()

    def __call__(self, x_vp: torch.Tensor, t) -> torch.Tensor:
        self.calls += 1
        t64 = torch.as_tensor(t, dtype=torch.float64).reshape(1)
        sigma = float(schedules.t_to_sigma(t64, self.train))
        x = x_vp.double() * math.sqrt(1 + sigma**2)  # VE coordinates
        return ((x - self.oracle(x, torch.tensor(sigma))) / sigma).to(x_vp.dtype)


def run_diffusers_loop(scheduler, model, z: torch.Tensor, steps: int) -> torch.Tensor:
    """diffusers' standard loop (as its pipelines run it) from unit noise z."""
    scheduler.set_timesteps(steps)
    x = z * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x).prev_sample
    return x


def run_diffusers(problem: Problem, factory, spacing_kw, per_step, nfe) -> tuple[float, int]:
    sigma_max = problem.oracle.sigma_max
    z = (problem.x_T / math.sqrt(1 + sigma_max**2)).float()
    model = _EpsModel(problem.oracle)
    out = run_diffusers_loop(factory(**spacing_kw), model, z, lf_steps(nfe, per_step))
    return _rms(out, problem.exact), model.calls


# ----- overhead: the sampler's own time per step, with a zero-cost denoiser -------------------
OVERHEAD_SHAPE = (1, 4, 64, 64)  # one SD latent
OVERHEAD_STEPS = 20


def _median_time(fn: Callable[[], object], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def lf_overhead_us(run) -> float:
    """Schedule + `sampling.sample` time per step around a zero-cost denoiser (like diffusers'
    set_timesteps + loop below)."""
    _, name, knobs, per_step = run
    steps = lf_steps(OVERHEAD_STEPS, per_step)
    x = torch.randn(OVERHEAD_SHAPE)
    train = sd_train_sigmas()

    def identity(x, sigma, **cond):
        return x

    def go():
        sig = schedules.get_sigmas(
            "karras", steps, sigma_min=float(train[0]), sigma_max=float(train[-1])
        )
        return sampling.sample(name, identity, x, sig, **knobs)

    go()  # warm-up
    return _median_time(go) / steps * 1e6


def diffusers_overhead_us(factory, per_step: int, spacing_kw: dict) -> float:
    steps = lf_steps(OVERHEAD_STEPS, per_step)
    z = torch.randn(OVERHEAD_SHAPE)

    def zero(x, t):
        return torch.zeros_like(x)

    def go():
        return run_diffusers_loop(scheduler, zero, z, steps)

    scheduler = factory(**spacing_kw)
    go()
    return _median_time(go) / steps * 1e6


# ----- the optimized schedule: ratio vs karras and its fit ---------------------------------------
def opt_vs_karras(problems: list[Problem], nfes=(5, 10), knots=None) -> dict:
    """Geometric-mean RMS ratio optimized / karras over `problems`, per sampler and NFE, and
    how many of the problems the optimized schedule wins."""
    out = {}
    for run in LF_RUNS:
        if run[0] not in FIT_SAMPLERS:
            continue
        for nfe in nfes:
            logs = [
                math.log(run_lf(p, run, "optimized", nfe, knots)[0])
                - math.log(run_lf(p, run, "karras", nfe)[0])
                for p in problems
            ]
            out.setdefault(run[0], {})[str(nfe)] = {
                "ratio": round(math.exp(sum(logs) / len(logs)), 4),
                "wins": f"{sum(v < 0 for v in logs)}/{len(logs)}",
            }
    return out


def _knots_from(theta) -> tuple[float, ...]:
    """Unconstrained parameters -> increasing knots from 0 to 1 (softmax increments)."""
    w = torch.softmax(torch.cat([torch.zeros(1), torch.as_tensor(theta, dtype=torch.float64)]), 0)
    return tuple(float(v) for v in torch.cat([torch.zeros(1, dtype=torch.float64), w.cumsum(0)]))


def _theta_from(knots) -> list[float]:
    inc = torch.as_tensor(knots, dtype=torch.float64).diff().log()
    return (inc[1:] - inc[0]).tolist()


def fit_optimized(
    seeds=FIT_SEEDS, knots: int = 10, nfes=(5, 10), maxfev: int = 400, log=print
) -> tuple[float, ...]:
    """Fit OPTIMIZED_KNOTS: minimise the mean over mixtures (2-D and 64-D, `seeds`), samplers
    (FIT_SAMPLERS) and NFE (`nfes`) of log(RMS error / RMS error with karras), by Powell's
    method over softmax increments of the knots, starting from the karras schedule's knots."""
    from scipy.optimize import minimize

    problems = [make_problem(dim, seed) for dim in DIMS for seed in seeds]
    runs = [r for r in LF_RUNS if r[0] in FIT_SAMPLERS]
    cases = [(p, r, nfe) for p in problems for r in runs for nfe in nfes]
    base = [math.log(run_lf(p, r, "karras", nfe)[0]) for p, r, nfe in cases]

    def loss(theta) -> float:
        k = _knots_from(theta)
        logs = [math.log(run_lf(p, r, "optimized", nfe, k)[0]) for p, r, nfe in cases]
        return sum(a - b for a, b in zip(logs, base, strict=True)) / len(cases)

    train = sd_train_sigmas()
    lo, hi = math.log(float(train[0])), math.log(float(train[-1]))
    start = lf_sigmas("karras", knots + 1)[:-1].log()
    res = minimize(
        loss, _theta_from(((hi - start) / (hi - lo)).tolist()), method="Powell",
        options={"maxfev": maxfev, "xtol": 1e-3, "ftol": 1e-5},
    )  # fmt: skip
    log(f"fit: mean log(RMS / karras RMS) = {res.fun:.4f} after {res.nfev} evaluations")
    return tuple(round(v, 4) for v in _knots_from(res.x))


# ----- main --------------------------------------------------------------------------------------
def run_benchmark(seed: int, nfes, use_diffusers: bool, unseen=UNSEEN_SEEDS, log=print) -> dict:
    rows = []
    problems = {}
    for dim in DIMS:
        log(f"[dim {dim}] exact ODE solutions ...")
        problems[dim] = make_problem(dim, seed)
    lf_over = {run[0]: lf_overhead_us(run) for run in LF_RUNS}
    for dim, prob in problems.items():
        for run in LF_RUNS:
            for spacing in LF_SPACINGS:
                for nfe in nfes:
                    rms, calls = run_lf(prob, run, spacing, nfe)
                    rows.append(_row(dim, run[0], spacing, nfe, calls, "latentforge", rms,
                                     lf_over[run[0]]))  # fmt: skip
    if use_diffusers:
        for label, factory, per_step, karras in diffusers_runs():
            for spacing, kw in _diffusers_spacings(karras).items():
                over = diffusers_overhead_us(factory, per_step, kw)
                for dim, prob in problems.items():
                    for nfe in nfes:
                        rms, calls = run_diffusers(prob, factory, kw, per_step, nfe)
                        rows.append(_row(dim, label, spacing, nfe, calls, "diffusers", rms, over))
    summary = {"best_at_nfe10": {}, "optimized_vs_karras": {}}
    for dim in DIMS:
        best = {}
        for impl in ("latentforge", "diffusers"):
            cands = [r for r in rows if r["dim"] == dim and r["nfe"] == 10 and r["impl"] == impl]
            if cands:
                b = min(cands, key=lambda r: r["rms"])
                best[impl] = {k: b[k] for k in ("sampler", "schedule", "rms")}
        if len(best) == 2:
            best["ratio"] = round(best["latentforge"]["rms"] / best["diffusers"]["rms"], 4)
        summary["best_at_nfe10"][str(dim)] = best
    log("optimized vs karras on the benchmark seed and unseen seeds ...")
    summary["optimized_vs_karras"]["benchmark_seed"] = opt_vs_karras(list(problems.values()))
    unseen_problems = [make_problem(dim, s) for s in unseen for dim in DIMS]
    summary["optimized_vs_karras"][f"unseen_seeds_{min(unseen)}-{max(unseen)}"] = opt_vs_karras(
        unseen_problems
    )
    config = {
        "seed": seed, "nfe": list(nfes), "dims_draws": DIMS, "components": COMPONENTS,
        "sigma_max": problems[2].oracle.sigma_max, "sigma_min": problems[2].oracle.sigma_min,
        "fit_seeds": list(FIT_SEEDS), "unseen_seeds": list(unseen),
        "overhead": f"us per step, zero-cost denoiser, shape {list(OVERHEAD_SHAPE)}, float32",
    }  # fmt: skip
    return {"config": config, "rows": rows, "summary": summary}


def _row(dim, sampler, schedule, nfe, calls, impl, rms, over) -> dict:
    return {
        "dim": dim, "sampler": sampler, "schedule": schedule, "nfe": nfe, "nfe_used": calls,
        "impl": impl, "rms": float(f"{rms:.4e}"), "overhead_us_per_step": round(over, 1),
    }  # fmt: skip


def format_table(result: dict) -> str:
    """Rows per (dim, impl, sampler, schedule); RMS at each NFE; then the summary ratios."""
    rows, nfes = result["rows"], result["config"]["nfe"]
    lines = []
    keys = sorted(
        {(r["dim"], r["impl"], r["sampler"], r["schedule"]) for r in rows},
        key=lambda k: (k[0], k[1] != "latentforge"),
    )
    by_key = {(r["dim"], r["impl"], r["sampler"], r["schedule"], r["nfe"]): r for r in rows}
    head = f"{'dim':>3} {'impl':11} {'sampler':16} {'schedule':15}"
    head += "".join(f"{'NFE ' + str(n):>10}" for n in nfes) + f"{'us/step':>9}"
    lines.append(head)
    for key in keys:
        cells = [by_key.get((*key, n)) for n in nfes]
        line = f"{key[0]:>3} {key[1]:11} {key[2]:16} {key[3]:15}"
        line += "".join(f"{c['rms']:>10.2e}" if c else f"{'-':>10}" for c in cells)
        over = next(c["overhead_us_per_step"] for c in cells if c)
        lines.append(line + f"{over:>9.0f}")
    lines.append("")
    for dim, best in result["summary"]["best_at_nfe10"].items():
        lines.append(f"{dim}-D best at NFE 10: {json.dumps(best)}")
    for where, ratios in result["summary"]["optimized_vs_karras"].items():
        lines.append(f"optimized / karras RMS ({where}): {json.dumps(ratios)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="latentforge bench samplers", description=__doc__)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="mixture seed")
    parser.add_argument("--nfe", default=",".join(map(str, NFES)), help="e.g. 5,10,20,50")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--no-diffusers", action="store_true", help="skip the diffusers runs")
    parser.add_argument("--fit", action="store_true", help="refit OPTIMIZED_KNOTS and print them")
    args = parser.parse_args(argv)
    if args.fit:
        print(f"OPTIMIZED_KNOTS = {fit_optimized(log=lambda m: print(m, file=sys.stderr))}")
        return 0
    try:
        nfes = tuple(int(v) for v in args.nfe.split(","))
    except ValueError:
        parser.error(f"--nfe must be comma-separated integers, got {args.nfe!r}")
    if any(n < 2 for n in nfes):
        parser.error("every --nfe must be >= 2")
    use_diffusers = not args.no_diffusers
    if use_diffusers:
        try:
            import diffusers  # noqa: F401
        except ImportError:
            print("diffusers is not installed: running latentforge only", file=sys.stderr)
            use_diffusers = False
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    result = run_benchmark(args.seed, nfes, use_diffusers, log=log)
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0
