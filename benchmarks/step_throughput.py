#!/usr/bin/env python
"""Images/s of one adversarial-training step: scoretune's engine against a textbook reference.

For each model and objective (TRADES-SE, PGD-AT-SE; 10-step linf PGD, eps 8/255, step 2/255) it

1. checks that ``scoretune.engine.train_step`` and the reference step (``benchmarks/_common.py``:
   the official SCORE code's attack semantics, i.e. TRADES attacks in eval mode, PGD-AT in train
   mode with BatchNorm batch statistics and running-statistics updates toward the plain one-hot;
   clean target forward, 10 ``torch.autograd.grad`` attack steps, separate clean and adversarial
   train-mode forwards, fp32) give the same loss to ``--tol`` (1e-5) in fp32 from the same
   initial weights, batch and random start (the start noise comes from one seeded generator),
   on the reference's memory layout; exits 1 after the timings if they do not;
2. times them interleaved (ref, ours, ref, ours, ...) after ``--warmup`` untimed steps, and prints
   one line per measurement ``name ours_img_per_s ref_img_per_s ratio`` (medians), followed by
   the loss difference of that configuration in fp32 on its own layout (and as run, when it
   autocasts to bf16), and the fp32 difference at the same adversarial point (a 0-step attack:
   both train on the random start).  PGD's sign() turns rounding differences (another memory
   layout, another convolution algorithm) into different adversarial points, so only changes
   that keep the attack's arithmetic identical stay within 1e-5 after the full attack on
   PreActResNet-18; the same-point difference shows the rounding itself.  Each line also gives
   the achieved TFLOP/s (matmul/convolution FLOPs of the step from ``torch.utils.flop_counter``)
   and, on a GPU of known bf16 peak (or with ``--peak-tflops``), the fraction of that peak.

"ours" is the engine exactly as ``Trainer`` runs it on that device: layout (``channels_last: auto``:
model and batches NHWC for these conv models, on CPU and CUDA), parameters frozen during the attack
(``scoretune.attacks.frozen_parameters``) and ``amp='auto'`` (bf16 autocast on CUDA, fp32 on CPU).
``--ablations`` adds the engine with one of those switched (``-channels_last``, ``-frozen_params``,
``+bf16`` on CPU / ``-bf16`` on CUDA, ``+cudnn_benchmark`` on CUDA), each timed in the same
interleaved rounds and checked in fp32; ``--compile`` adds ``nn.Module.compile()`` (compile time
reported separately).

On a shared machine use ``--threads 1 --clock cpu`` (process CPU time of a single-threaded run):
wall time there mostly measures the other users.  Example::

    python benchmarks/step_throughput.py --device cpu --threads 1 --clock cpu --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    ATTACK,
    NO_ATTACK,
    OBJECTIVES,
    fixed_batch,
    machine_info,
    reference_step,
    seeded_model,
    sgd,
)
from scoretune import attacks  # noqa: E402
from scoretune.engine import memory_format_for, train_step  # noqa: E402

DEFAULT_MODELS = {"cpu": ("small_cnn", "preact_resnet18"), "cuda": ("small_cnn", "preact_resnet18", "wrn-28-10")}
DEFAULT_BATCH = {
    "cpu": {"small_cnn": 128, "preact_resnet18": 32, "wrn-28-10": 16},
    "cuda": {"small_cnn": 128, "preact_resnet18": 128, "wrn-28-10": 128},
}


# ----------------------------------------------------------------------------- one step of each kind


def place(model: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    """The model in channels_last (NHWC) memory format when asked, as ``Trainer`` places it."""
    return model.to(memory_format=torch.channels_last) if channels_last else model


def engine_placement(model: torch.nn.Module) -> bool:
    """channels_last exactly where ``Trainer`` uses it (``memory_format_for`` with the default
    ``channels_last: auto``; the benchmark's inputs are 3x32x32 images)."""
    return memory_format_for("auto", model, (3, 32, 32)) is torch.channels_last


@contextlib.contextmanager
def fp32_exact(device: torch.device):
    """TF32 off and deterministic cuDNN while the fp32 equivalence check runs (no-op on CPU)."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = saved


class Runner:
    """A model copy, its optimiser, its batch and a seeded generator: one callable training step."""

    def __init__(self, kind: str, base: torch.nn.Module, x, y, objective, device, *, channels_last=False,
                 amp="auto", compile_model=False, unfrozen=False, cudnn_benchmark=False, seed=1, attack=ATTACK):
        self.kind, self.objective, self.device, self.amp, self.unfrozen = kind, objective, device, amp, unfrozen
        self.attack = attack
        self.cudnn_benchmark = cudnn_benchmark
        model = place(copy.deepcopy(base), channels_last)
        # batches in the model's layout, as BatchLoader yields them for a channels_last Trainer
        self.x, self.y = (x.contiguous(memory_format=torch.channels_last) if channels_last else x), y
        if compile_model:
            model.compile()
        self.model, self.optimizer = model, sgd(model)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self) -> float:
        if self.kind == "ref":
            return reference_step(self.model, self.x, self.y, self.objective, self.attack, self.optimizer,
                                  self.generator)["loss"]
        with contextlib.ExitStack() as stack:
            if self.unfrozen:
                stack.enter_context(unfrozen_attack_parameters())
            if self.cudnn_benchmark:
                stack.enter_context(cudnn_benchmark())
            terms, _, _ = train_step(self.model, self.x, self.y, self.objective, self.attack, self.optimizer,
                                     device=self.device, amp=self.amp, generator=self.generator)
        return float(terms["loss"].mean())


@contextlib.contextmanager
def cudnn_benchmark():
    """Ablation: cuDNN autotuning (``torch.backends.cudnn.benchmark``) for the duration of a step."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


@contextlib.contextmanager
def unfrozen_attack_parameters():
    """Ablation: the engine's attack without :func:`scoretune.attacks.frozen_parameters` (the
    parameters keep ``requires_grad`` during the attack, as in the reference; bit-identical)."""
    original = attacks.frozen_parameters
    attacks.frozen_parameters = lambda model: contextlib.nullcontext(model)
    try:
        yield
    finally:
        attacks.frozen_parameters = original


# ----------------------------------------------------------------------------- FLOPs and peak


# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by GPU name, from NVIDIA's data sheets.
BF16_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0,
                    "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def bf16_peak_tflops(device: torch.device, given: float | None) -> float | None:
    """``--peak-tflops`` if given, else the table's entry for this GPU (longest matching name), else None."""
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    hits = [k for k in BF16_PEAK_TFLOPS if k in name]
    return BF16_PEAK_TFLOPS[max(hits, key=len)] if hits else None


def step_flops(base: torch.nn.Module, x: torch.Tensor, objective, attack) -> float:
    """Matmul/convolution FLOPs of one training step (``torch.utils.flop_counter``), composed from a
    counted forward F of the batch, its training backward B (weight gradients; the batch itself
    needs none) and the attack's input-only backward B_in (parameters frozen):
    TRADES F + k (F + B_in) + 2 (F + B), PGD-AT k (F + B_in) + F + B, for a k-step attack.
    (FlopCounterMode cannot run through the attack's ``autograd.grad`` itself.)"""
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(base)

    def count(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    fwd = count(lambda: model(x))
    full = count(lambda: model(x).float().sum().backward()) - fwd

    def input_only():
        xi = x.clone().requires_grad_(True)
        with attacks.frozen_parameters(model):
            model(xi).float().sum().backward()

    inp = count(input_only) - fwd
    k = attack.steps
    if objective.method == "trades":
        return float(fwd + k * (fwd + inp) + 2 * (fwd + full))
    return float(k * (fwd + inp) + fwd + full)


# ----------------------------------------------------------------------------- timing


def timer(device: torch.device, clock: str) -> Callable[[Callable[[], object]], float]:
    """Seconds one call takes: wall clock (CUDA-synchronised) or this process's CPU time."""
    now = time.process_time if clock == "cpu" else time.perf_counter

    def measure(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = now()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return now() - t0

    return measure


def interleaved(runners: dict[str, Runner], repeats: int, measure) -> dict[str, list[float]]:
    """``repeats`` rounds; each round times every runner once, in the order given (ref first)."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            times[name].append(measure(run))
    return times


# ----------------------------------------------------------------------------- one model x objective


def variants(args, device: torch.device, base: torch.nn.Module) -> dict[str, dict]:
    """The step configurations timed against the reference: the engine, plus ablations/compile."""
    cl = engine_placement(base)
    out = {"ours": {"channels_last": cl, "amp": "auto"}}
    if args.ablations:
        out["ours-channels_last" if cl else "ours+channels_last"] = {"channels_last": not cl, "amp": "auto"}
        out["ours-frozen_params"] = {"channels_last": cl, "amp": "auto", "unfrozen": True}
        if device.type == "cpu":
            out["ours+bf16"] = {"channels_last": cl, "amp": "on"}
        else:
            out["ours-bf16"] = {"channels_last": cl, "amp": "off"}
            out["ours+cudnn_benchmark"] = {"channels_last": cl, "amp": "auto", "cudnn_benchmark": True}
    if args.compile:
        out["ours+compile"] = {"channels_last": cl, "amp": "auto", "compile": True}
    return out


def bench_one(args, device, model_name: str, objective_name: str, batch_size: int) -> list[dict]:
    objective = OBJECTIVES[objective_name]
    x, y = fixed_batch(batch_size, device=device)
    base = seeded_model(model_name, device=device)
    measure = timer(device, args.clock)
    configs = variants(args, device, base)

    # 1. Equivalence from identical starting points (fresh copies, same generator seed).  The
    # assertion: the engine in fp32 on the reference's memory layout.  Reported for every
    # variant: its loss in fp32 on its own layout, and as run (bf16 where it autocasts).
    with fp32_exact(device):
        ref_loss = Runner("ref", base, x, y, objective, device)()
        engine_fp32 = Runner("ours", base, x, y, objective, device, amp="off")()
        fp32, as_run = {}, {}
        for name, cfg in configs.items():
            if not (cfg["channels_last"] or cfg.get("unfrozen") or cfg.get("compile") or cfg.get("cudnn_benchmark")):
                fp32[name] = engine_fp32  # the same configuration as the assertion's
            elif not cfg.get("compile"):  # a compiled variant is checked after its compile is timed
                fp32[name] = Runner("ours", base, x, y, objective, device, **_kw(dict(cfg, amp="off")))()
    for name, cfg in configs.items():
        if not cfg.get("compile"):
            as_run[name] = fp32[name] if _fp32_anyway(cfg, device) else \
                Runner("ours", base, x, y, objective, device, **_kw(cfg))()
    # The same adversarial point for both (a 0-step attack: its random start only): the fp32 loss
    # difference of each layout without PGD's sign() amplifying the rounding.
    with fp32_exact(device):
        ref0 = Runner("ref", base, x, y, objective, device, attack=NO_ATTACK)()
        same_point = {name: abs(Runner("ours", base, x, y, objective, device, attack=NO_ATTACK,
                                       **_kw(dict(cfg, amp="off", compile=False)))() - ref0)
                      for name, cfg in configs.items()}

    # 2. timing: fresh copies again; warm-up steps (and compiles) untimed, then interleaved rounds.
    runners = {"ref": Runner("ref", base, x, y, objective, device)}
    compile_s = None
    for name, cfg in configs.items():
        runners[name] = Runner("ours", base, x, y, objective, device, **_kw(cfg))
    wall = timer(device, "wall")  # compile time: wall clock (inductor compiles in worker processes)
    for name, run in runners.items():
        first = wall(run)
        if configs.get(name, {}).get("compile"):
            compile_s = first
    for _ in range(max(args.warmup - 1, 0)):
        for run in runners.values():
            run()
    if compile_s is not None:
        steady = statistics.median([wall(runners["ours+compile"]) for _ in range(2)])
        compile_s = max(compile_s - steady, 0.0)
        cfg = configs["ours+compile"]
        with fp32_exact(device):
            fp32["ours+compile"] = Runner("ours", base, x, y, objective, device, **_kw(dict(cfg, amp="off")))()
        as_run["ours+compile"] = fp32["ours+compile"] if _fp32_anyway(cfg, device) else \
            Runner("ours", base, x, y, objective, device, **_kw(cfg))()
    times = interleaved(runners, args.repeats, measure)

    ref_med = statistics.median(times["ref"])
    flops = step_flops(base, x, objective, ATTACK)
    peak = bf16_peak_tflops(device, args.peak_tflops)
    rows = []
    for name in configs:
        med = statistics.median(times[name])
        rows.append({
            "name": f"{model_name}/{objective_name}/bs{batch_size}/{name}",
            "model": model_name, "objective": objective_name, "batch_size": batch_size, "variant": name,
            "config": configs[name],
            "ours_img_per_s": batch_size / med, "ref_img_per_s": batch_size / ref_med, "ratio": ref_med / med,
            "ours_times_s": times[name], "ref_times_s": times["ref"],
            "step_gflop": flops / 1e9, "ours_tflop_per_s": flops / med / 1e12,
            "ref_tflop_per_s": flops / ref_med / 1e12, "peak_tflop_per_s": peak,
            "ours_peak_fraction": flops / med / 1e12 / peak if peak else None,
            "fp32_loss_ref": ref_loss, "fp32_loss_engine": engine_fp32,
            "fp32_loss_diff_engine": abs(engine_fp32 - ref_loss),
            "fp32_loss_variant": fp32[name], "fp32_loss_diff": abs(fp32[name] - ref_loss),
            "loss_as_run": as_run[name], "loss_diff_as_run": abs(as_run[name] - ref_loss),
            "fp32_loss_diff_same_point": same_point[name],
            "compile_s": compile_s if name == "ours+compile" else None,
        })
    return rows


def _kw(cfg: dict) -> dict:
    return {"channels_last": cfg.get("channels_last", False), "amp": cfg.get("amp", "auto"),
            "compile_model": cfg.get("compile", False), "unfrozen": cfg.get("unfrozen", False),
            "cudnn_benchmark": cfg.get("cudnn_benchmark", False)}


def _fp32_anyway(cfg: dict, device: torch.device) -> bool:
    """True when the configuration runs in fp32 (amp 'off', or 'auto' off CUDA)."""
    return cfg["amp"] == "off" or (cfg["amp"] == "auto" and device.type != "cuda")


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--models", default=None,
                   help="comma-separated (default: small_cnn,preact_resnet18 on cpu; plus wrn-28-10 on cuda)")
    p.add_argument("--objectives", default="trades_se,pgdat_se", help="comma-separated: trades_se, pgdat_se")
    p.add_argument("--batch-size", type=int, default=None,
                   help="one batch size for every model (default: small_cnn 128, preact_resnet18 32 on cpu / "
                        "128 on cuda, wrn-28-10 128)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (each times ref and ours once)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of each before timing (at least 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall clock, or process CPU time (robust on a shared machine with --threads 1)")
    p.add_argument("--tol", type=float, default=1e-5, help="largest allowed fp32 loss difference ours vs ref")
    p.add_argument("--ablations", action="store_true",
                   help="also time the engine with one of its settings switched: channels_last, parameters not "
                        "frozen during the attack, bf16 autocast on CPU (fp32 on CUDA), cudnn.benchmark")
    p.add_argument("--compile", action="store_true", help="also time the engine on nn.Module.compile()")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense bf16 peak in TFLOP/s for the 'fraction of peak' note (default: a table "
                        "of NVIDIA GPUs by name, e.g. H100 SXM 989; none on CPU)")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="write all results to OUT")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible to torch (use --device cpu)")
    if args.clock == "cpu" and args.device == "cuda":
        p.error("--clock cpu measures host CPU time only; use --clock wall with --device cuda")
    unknown = set(args.objectives.split(",")) - set(OBJECTIVES)
    if unknown:
        p.error(f"unknown objective(s) {sorted(unknown)}; choose from: {', '.join(OBJECTIVES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = args.models.split(",") if args.models else list(DEFAULT_MODELS[device.type])
    info = machine_info(device)
    print("# " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    print("# name ours_img_per_s ref_img_per_s ratio   (fp32 loss diff; medians of "
          f"{args.repeats} interleaved rounds, clock={args.clock})", flush=True)
    rows, failed = [], []
    for model_name in models:
        bs = args.batch_size or DEFAULT_BATCH[device.type].get(model_name, 32)
        for objective_name in args.objectives.split(","):
            rows_now = bench_one(args, device, model_name, objective_name, bs)
            for row in rows_now:
                rows.append(row)
                asserted = row["fp32_loss_diff_engine"]
                notes = [f"fp32 loss diff {row['fp32_loss_diff']:.1e}"
                         + (" > tol" if row["fp32_loss_diff"] == asserted and asserted > args.tol else "")
                         + f", {row['fp32_loss_diff_same_point']:.1e} at the same adversarial point"]
                if row["variant"] == "ours" and row["fp32_loss_diff"] != asserted:
                    notes.append(f"{asserted:.1e} on the reference's layout (asserted"
                                 + (", > tol)" if asserted > args.tol else ")"))
                if row["loss_as_run"] != row["fp32_loss_variant"]:
                    notes.append(f"as run {row['loss_diff_as_run']:.1e}")
                if row["compile_s"] is not None:
                    notes.append(f"compile {row['compile_s']:.1f} s")
                notes.append(f"{row['ours_tflop_per_s']:.3g} TFLOP/s"
                             + (f" = {row['ours_peak_fraction']:.1%} of {row['peak_tflop_per_s']:g} bf16 peak"
                                if row["ours_peak_fraction"] is not None else ""))
                print(f"{row['name']} {row['ours_img_per_s']:.2f} {row['ref_img_per_s']:.2f} {row['ratio']:.3f}"
                      f"   ({', '.join(notes)})", flush=True)
            if rows_now[0]["fp32_loss_diff_engine"] > args.tol:
                failed.append(f"{model_name}/{objective_name} ({rows_now[0]['fp32_loss_diff_engine']:.1e})")
    info_end = machine_info(device)
    if args.json_out:
        out = {"machine": info, "loadavg_end": info_end["loadavg"], "settings": vars(args), "results": rows}
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    if failed:
        print(f"FAIL: the engine's fp32 loss differs from the reference's by more than {args.tol}: "
              + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
