"""`latentforge bench samplers`: sampler accuracy and overhead against the exact ODE solution.

Every run starts from the same state x_T at Stable Diffusion's sigma_max (the scaled_linear
1000-step schedule, sigma 14.6146 .. 0.0292) and is compared with the exact probability-flow
ODE solution at sigma = 0 of the same x_T (`analytic.ode_solution`, DOP853 at rtol 1e-9), on a
2-D and a 64-D Gaussian mixture of 8 components drawn from `--seed`, 16,384 noise draws each
(the few draws that end in another component than the exact solution dominate an RMS over a few
hundred). x_T = z sqrt(1 + sigma_max^2) for unit noise z; each diffusers scheduler gets the z
that its loop (`z * init_noise_sigma`, in its own VP or VE coordinates) turns into that x_T.

Per run: rms_error (over all draws and coordinates), median_error (median over draws of each
draw's RMS error), flips (draws whose result lies in another mixture component than the exact
solution's: the most likely component at sigma 0) and overhead_us (the sampler's own time per
step around a zero-cost denoiser, on a batch of 16 4x32x32 latents; `--json` adds the `tiny`
U-Net's forward time on that batch as the yardstick).

NFE = denoiser calls, counted. Samplers with 2 calls per step (heun, dpm2, dpmpp_2s) get
(NFE + 1) // 2 steps, i.e. 2 * steps - 1 <= NFE calls (their last step, to sigma 0, is one
call). diffusers' schedulers see the same oracle wrapped as an eps-prediction model on the
discrete SD schedule (timestep -> sigma by log-linear interpolation, as its Euler/Heun do);
each is run with linspace, trailing and (where offered) Karras sigmas.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import click
import torch

from .. import analytic, sampling, schedules
from . import CONTEXT, one_line, script_main

DEFAULT_SEED = 0
FIT_SEEDS = (1000, 1001, 1002, 1003, 1004, 1005)  # the optimized schedule is fitted on these
UNSEEN_SEEDS = (2000, 2001, 2002, 2003, 2004)  # ... and checked on these (and DEFAULT_SEED)
NFES = (5, 10, 20, 50)
DIMS = {2: 16384, 64: 16384}  # dimension -> noise draws of the benchmark
FIT_DRAWS = {2: 2048, 64: 256}  # draws per mixture when fitting the optimized schedule
UNSEEN_DRAWS = {2: 4096, 64: 1024}  # draws per mixture when checking it on unseen seeds
ODE_RTOL = 1e-9
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
# (polyexponential at its default rho = 1 is exponential; linspace runs on the diffusers side)
LF_SPACINGS = ("karras", "exponential", "vp", "optimized", "trailing")
# The samplers the optimized schedule is fitted for, and reported on.
FIT_SAMPLERS = ("dpmpp_2m", "unipc(bh2)", "unipc(order=3)")


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
    """The mixture of `seed`, draws of unit noise from seed + 1, and their exact solutions.
    A problem's first n draws are the same whatever `draws` is."""
    train = sd_train_sigmas()
    sigma_min, sigma_max = float(train[0]), float(train[-1])
    oracle = analytic.random_mixture(
        dim, COMPONENTS, seed, sigma_min=sigma_min, sigma_max=sigma_max
    )
    g = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(draws or DIMS[dim], dim, generator=g, dtype=torch.float64)
    x_T = z * math.sqrt(1 + sigma_max**2)
    exact = analytic.ode_solution(oracle, x_T, sigma_max, rtol=ODE_RTOL, atol=ODE_RTOL * 1e-2)
    return Problem(dim, seed, oracle, x_T, exact)


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


def lf_sigmas(spacing: str, steps: int, knots=None) -> torch.Tensor:
    train = sd_train_sigmas()
    if spacing == "optimized" and knots is not None:
        return schedules.get_sigmas_optimized(steps, float(train[0]), float(train[-1]), knots)
    return schedules.get_sigmas(
        spacing, steps, sigma_min=float(train[0]), sigma_max=float(train[-1]), train_sigmas=train
    )


def lf_output(problem: Problem, run, spacing: str, nfe: int, knots=None):
    """(result, denoiser calls) of one latentforge run, float32 like a real model's."""
    _, name, knobs, per_step = run
    den = _Counted(problem.oracle)
    sigmas = lf_sigmas(spacing, sampling.steps_for_nfe(nfe, per_step), knots)
    out = sampling.sample(name, den, problem.x_T.float(), sigmas, **knobs)
    return out, den.calls


def run_lf(problem: Problem, run, spacing: str, nfe: int, knots=None) -> tuple[float, int]:
    """(RMS error vs the exact solution, denoiser calls) of one latentforge run."""
    out, calls = lf_output(problem, run, spacing, nfe, knots)
    return _rms(out, problem.exact), calls


def _rms(out: torch.Tensor, exact: torch.Tensor) -> float:
    return float((out.double() - exact).pow(2).mean().sqrt())


def errors(problem: Problem, out: torch.Tensor) -> dict:
    """rms_error, median_error (of the per-draw RMS errors) and flips against the exact ODE
    solution; a flip is a draw whose most likely component differs from the exact one's."""
    err = (out.double() - problem.exact).pow(2).mean(1)
    if not torch.isfinite(err).all():
        return {"rms_error": float("inf"), "median_error": float("inf"), "flips": len(err)}
    flips = problem.oracle.component(out) != problem.oracle.component(problem.exact)
    return {
        "rms_error": float(f"{float(err.mean().sqrt()):.4e}"),
        "median_error": float(f"{float(err.sqrt().median()):.4e}"),
        "flips": int(flips.sum()),
    }


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


def _start_noise(scheduler, x_T: torch.Tensor, steps: int) -> torch.Tensor:
    """The z for which diffusers' loop starts at x_T: x = z * init_noise_sigma, in VE
    coordinates for schedulers whose scale_model_input rescales (Euler, Heun), VP otherwise."""
    scheduler.set_timesteps(steps)
    sigma_max = float(sd_train_sigmas()[-1])
    t0 = scheduler.timesteps[0]
    probe = torch.ones(1)
    ve = not torch.equal(scheduler.scale_model_input(probe, t0), probe)
    if hasattr(scheduler, "_step_index"):
        scheduler._step_index = None  # scale_model_input may have started the step counter
    x = x_T if ve else x_T / math.sqrt(1 + sigma_max**2)
    return x / float(scheduler.init_noise_sigma)


def diffusers_output(problem: Problem, factory, spacing_kw, per_step, nfe):
    steps = sampling.steps_for_nfe(nfe, per_step)
    z = _start_noise(factory(**spacing_kw), problem.x_T, steps).float()
    model = _EpsModel(problem.oracle)
    out = run_diffusers_loop(factory(**spacing_kw), model, z, steps)
    return out, model.calls


def run_diffusers(problem: Problem, factory, spacing_kw, per_step, nfe) -> tuple[float, int]:
    out, calls = diffusers_output(problem, factory, spacing_kw, per_step, nfe)
    return _rms(out, problem.exact), calls


# ----- overhead: the sampler's own time per step, with a zero-cost denoiser -------------------
OVERHEAD_SHAPE = (16, 4, 32, 32)  # a batch of 16 latents at 32x32, as the target states
OVERHEAD_STEPS = 20
REPEATS = {"n": 5}  # timing repeats (median taken); --repeats


def _median_time(fn: Callable[[], object]) -> float:
    times = []
    for _ in range(REPEATS["n"]):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def lf_overhead_us(run) -> float:
    """Schedule + `sampling.sample` time per step around a zero-cost denoiser (like diffusers'
    set_timesteps + loop below)."""
    _, name, knobs, per_step = run
    steps = sampling.steps_for_nfe(OVERHEAD_STEPS, per_step)
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
    steps = sampling.steps_for_nfe(OVERHEAD_STEPS, per_step)
    z = torch.randn(OVERHEAD_SHAPE)

    def zero(x, t):
        return torch.zeros_like(x)

    def go():
        return run_diffusers_loop(scheduler, zero, z, steps)

    scheduler = factory(**spacing_kw)
    go()
    return _median_time(go) / steps * 1e6


def unet_forward_us() -> float:
    """The yardstick for overhead: one forward of the `tiny` U-Net on OVERHEAD_SHAPE."""
    from ..models.presets import unet_preset
    from ..models.unet import UNet

    unet = UNet(unet_preset("tiny", in_channels=OVERHEAD_SHAPE[1], out_channels=OVERHEAD_SHAPE[1]))
    unet.eval()
    x, t = torch.randn(OVERHEAD_SHAPE), torch.full((OVERHEAD_SHAPE[0],), 500.0)
    with torch.no_grad():
        unet(x, t)
        return _median_time(lambda: unet(x, t)) * 1e6


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
    seeds=FIT_SEEDS, nfes=(5, 10), maxfev: int = 250, start=None, log=print
) -> tuple[float, ...]:
    """Fit OPTIMIZED_KNOTS: minimise the mean over mixtures (2-D and 64-D, `seeds`), samplers
    (FIT_SAMPLERS) and NFE (`nfes`) of log(RMS error / RMS error with karras), by Powell's
    method over softmax increments of the knots, starting from `start` (default: the current
    OPTIMIZED_KNOTS; the first fit started from the karras schedule's levels)."""
    from scipy.optimize import minimize

    problems = [make_problem(dim, seed, FIT_DRAWS[dim]) for dim in DIMS for seed in seeds]
    runs = [r for r in LF_RUNS if r[0] in FIT_SAMPLERS]
    cases = [(p, r, nfe) for p in problems for r in runs for nfe in nfes]
    base = [math.log(run_lf(p, r, "karras", nfe)[0]) for p, r, nfe in cases]

    evals = [0]

    def loss(theta) -> float:
        k = _knots_from(theta)
        logs = [math.log(run_lf(p, r, "optimized", nfe, k)[0]) for p, r, nfe in cases]
        value = sum(a - b for a, b in zip(logs, base, strict=True)) / len(cases)
        evals[0] += 1
        if evals[0] % 20 == 0:
            log(f"fit: evaluation {evals[0]}, loss {value:.4f}, knots {k}")
        return value

    start = schedules.OPTIMIZED_KNOTS if start is None else start
    res = minimize(
        loss, _theta_from(start), method="Powell",
        options={"maxfev": maxfev, "xtol": 1e-3, "ftol": 1e-5},
    )  # fmt: skip
    log(f"fit: mean log(RMS / karras RMS) = {res.fun:.4f} after {res.nfev} evaluations")
    return tuple(round(v, 4) for v in _knots_from(res.x))


# ----- main --------------------------------------------------------------------------------------
def _record(dim, impl, sampler, schedule, nfe, calls, errs, over) -> dict:
    return {"impl": impl, "sampler": sampler, "schedule": schedule, "nfe": nfe, **errs,
            "overhead_us": round(over, 1), "dim": dim, "nfe_used": calls}  # fmt: skip


def run_benchmark(seed: int, nfes, use_diffusers: bool, log=print) -> list[dict]:
    """Every record of the benchmark (see the module docstring)."""
    problems = {}
    for dim, draws in DIMS.items():
        log(f"[dim {dim}] exact ODE solutions of {draws} draws ...")
        problems[dim] = make_problem(dim, seed, draws)
    rows = []
    for run in LF_RUNS:
        over = lf_overhead_us(run)
        for dim, prob in problems.items():
            for spacing in LF_SPACINGS:
                for nfe in nfes:
                    out, calls = lf_output(prob, run, spacing, nfe)
                    errs = errors(prob, out)
                    rows.append(
                        _record(dim, "latentforge", run[0], spacing, nfe, calls, errs, over)
                    )
        log(f"latentforge {run[0]} done")
    if use_diffusers:
        for label, factory, per_step, karras in diffusers_runs():
            for spacing, kw in _diffusers_spacings(karras).items():
                over = diffusers_overhead_us(factory, per_step, kw)
                for dim, prob in problems.items():
                    for nfe in nfes:
                        out, calls = diffusers_output(prob, factory, kw, per_step, nfe)
                        errs = errors(prob, out)
                        rows.append(
                            _record(dim, "diffusers", label, spacing, nfe, calls, errs, over)
                        )
            log(f"diffusers {label} done")
    return rows


def best_at(rows: list[dict], dim: int, nfe: int) -> dict:
    """The lowest-RMS record per implementation at (dim, nfe), and latentforge / diffusers."""
    best = {}
    for impl in ("latentforge", "diffusers"):
        cands = [r for r in rows if r["dim"] == dim and r["nfe"] == nfe and r["impl"] == impl]
        if cands:
            b = min(cands, key=lambda r: r["rms_error"])
            best[impl] = {k: b[k] for k in ("sampler", "schedule", "rms_error", "flips")}
    if len(best) == 2:
        best["ratio"] = round(best["latentforge"]["rms_error"] / best["diffusers"]["rms_error"], 4)
    return best


def summarize(rows: list[dict], seed: int, unseen=UNSEEN_SEEDS, log=print) -> dict:
    """Best per implementation at NFE 10; optimized vs karras on the benchmark's seed (from the
    rows) and on unseen seeds (fresh problems with FIT_DRAWS draws)."""
    summary = {"best_at_nfe10": {str(d): best_at(rows, d, 10) for d in DIMS}}
    ratios = {}
    for run in FIT_SAMPLERS:
        for nfe in (5, 10):
            pick = {r["schedule"]: r["rms_error"] for r in rows if r["sampler"] == run
                    and r["nfe"] == nfe and r["impl"] == "latentforge"
                    and r["schedule"] in ("optimized", "karras") and r["dim"] == 64}  # fmt: skip
            if len(pick) == 2:
                ratios.setdefault(run, {})[str(nfe)] = round(pick["optimized"] / pick["karras"], 4)
    summary["optimized_vs_karras_64d_seed"] = {"seed": seed, "ratio": ratios}
    if unseen:
        log(f"optimized vs karras on unseen seeds {list(unseen)} ...")
        probs = [make_problem(dim, s, UNSEEN_DRAWS[dim]) for s in unseen for dim in DIMS]
        summary["optimized_vs_karras_unseen"] = {"seeds": list(unseen), **opt_vs_karras(probs)}
        summary["best_at_nfe10_unseen_64d"] = unseen_head_to_head(
            [p for p in probs if p.dim == 64], log
        )
    return summary


def unseen_head_to_head(problems: list[Problem], log=print) -> list[dict]:
    """Per unseen 64-D mixture at NFE 10: latentforge's best (FIT_SAMPLERS x karras/optimized)
    against diffusers' best scheduler with Karras sigmas (skipped without diffusers)."""
    try:
        runs = [d for d in diffusers_runs() if d[3]]
    except ImportError:
        return []
    out = []
    for prob in problems:
        lf = min(
            (run_lf(prob, run, sp, 10)[0], f"{run[0]}/{sp}")
            for run in LF_RUNS
            if run[0] in FIT_SAMPLERS
            for sp in ("karras", "optimized")
        )
        kw = _diffusers_spacings(True)["karras"]
        df = min((run_diffusers(prob, f, kw, per, 10)[0], label) for label, f, per, _ in runs)
        ratio = round(lf[0] / df[0], 4)
        out.append({"seed": prob.seed, "latentforge": lf[1], "latentforge_rms": lf[0],
                    "diffusers": df[1], "diffusers_rms": df[0], "ratio": ratio})  # fmt: skip
        log(f"unseen seed {prob.seed}: {out[-1]}")
    return out


def format_table(rows: list[dict], nfes) -> str:
    """RMS error per (dim, impl, sampler, schedule) at each NFE, then the overhead per step."""
    keys = sorted(
        {(r["dim"], r["impl"], r["sampler"], r["schedule"]) for r in rows},
        key=lambda k: (k[0], k[1] != "latentforge"),
    )
    by_key = {(r["dim"], r["impl"], r["sampler"], r["schedule"], r["nfe"]): r for r in rows}
    head = f"{'dim':>3} {'impl':11} {'sampler':16} {'schedule':15}"
    lines = [head + "".join(f"{'NFE ' + str(n):>10}" for n in nfes) + f"{'us/step':>9}"]
    for key in keys:
        cells = [by_key.get((*key, n)) for n in nfes]
        line = f"{key[0]:>3} {key[1]:11} {key[2]:16} {key[3]:15}"
        line += "".join(f"{c['rms_error']:>10.2e}" if c else f"{'-':>10}" for c in cells)
        lines.append(line + f"{next(c['overhead_us'] for c in cells if c):>9.0f}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """RMS error vs NFE, one panel per dimension: every latentforge sampler at its best
    schedule per NFE, and every diffusers scheduler likewise (dashed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(
            "latentforge: error: --plot needs matplotlib (pip install matplotlib)"
        ) from e
    dims = sorted({r["dim"] for r in rows})
    fig, axes = plt.subplots(1, len(dims), figsize=(6.5 * len(dims), 5), squeeze=False)
    for ax, dim in zip(axes[0], dims, strict=True):
        for impl, style in (("latentforge", "-"), ("diffusers", "--")):
            names = dict.fromkeys(r["sampler"] for r in rows if r["impl"] == impl)
            for name in names:
                pts = {}
                for r in rows:
                    if (r["impl"], r["sampler"], r["dim"]) == (impl, name, dim):
                        pts[r["nfe"]] = min(pts.get(r["nfe"], math.inf), r["rms_error"])
                nfe = sorted(pts)
                tag = "lf" if impl == "latentforge" else "diffusers"
                ax.plot(
                    nfe, [pts[n] for n in nfe], style, marker="o", ms=3, label=f"{name} ({tag})"
                )
        ax.set(xscale="log", yscale="log", xlabel="NFE (denoiser calls)")
        ax.set(ylabel="RMS error vs exact ODE solution", title=f"{dim}-D mixture, best schedule")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _nfes(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    """--nfe "5,10" -> (5, 10); every count at least 2."""
    try:
        nfes = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"must be comma-separated integers, got {value!r}") from None
    if any(n < 2 for n in nfes):
        raise click.BadParameter("every count must be >= 2")
    return nfes


@click.command("samplers", help=__doc__, short_help=one_line(__doc__), context_settings=CONTEXT)
@click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True, help="mixture seed")
@click.option("--nfe", "nfes", default=",".join(map(str, NFES)), show_default=True, metavar="LIST",
              callback=_nfes, help="e.g. 5,10,20,50")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="print the records as JSON")
@click.option("--no-diffusers", is_flag=True, help="skip the diffusers runs")
@click.option("--draws", type=click.IntRange(min=1), default=None,
              help="noise draws per mixture (default 16384)")  # fmt: skip
@click.option("--no-unseen", is_flag=True, help="skip the unseen-seed check")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="timing repeats (median)")  # fmt: skip
@click.option("--plot", "plot_path", metavar="PNG", default=None,
              help="also plot error vs NFE (matplotlib)")  # fmt: skip
@click.option("--fit", is_flag=True, help="refit OPTIMIZED_KNOTS and print them")
def command(seed: int, nfes: tuple[int, ...], as_json: bool, no_diffusers: bool,
            draws: int | None, no_unseen: bool, repeats: int, plot_path: str | None,
            fit: bool) -> int:  # fmt: skip
    if fit:
        print(f"OPTIMIZED_KNOTS = {fit_optimized(log=lambda m: print(m, file=sys.stderr))}")
        return 0
    if draws is not None:
        for dim in DIMS:
            DIMS[dim] = draws
    REPEATS["n"] = repeats
    use_diffusers = not no_diffusers
    if use_diffusers:
        try:
            import diffusers  # noqa: F401
        except ImportError:
            print("diffusers is not installed: running latentforge only", file=sys.stderr)
            use_diffusers = False

    def log(*a):
        print(*a, file=sys.stderr)

    rows = run_benchmark(seed, nfes, use_diffusers, log=log)
    summary = summarize(rows, seed, () if no_unseen else UNSEEN_SEEDS, log=log)
    summary["overhead_yardstick"] = {
        "tiny_unet_forward_us": round(unet_forward_us(), 1),
        "shape": list(OVERHEAD_SHAPE),
    }
    if plot_path:
        plot(rows, plot_path)
    if as_json:
        print(json.dumps(rows, indent=1))
        log(json.dumps(summary, indent=1))
    else:
        print(format_table(rows, nfes))
        print(json.dumps(summary, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python bench/samplers.py ARGS`: the same as `latentforge bench samplers ARGS`."""
    return script_main(command, argv)
