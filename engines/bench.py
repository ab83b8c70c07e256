"""``osteoscreen engines bench``: parity and speed of every available backend, in one run.

For each backend (and, on GPU backends whose model card allows it, each precision):
- parity of every shipped network against the PyTorch reference (CPU, fp32, eager), on
  fresh random inputs and on real inputs from the bundled CT (engines.parity);
- the slice selector (DRLIS Q-network) over a 300-slice volume: one batched call of 300
  states; the fused model at batch 1 (image encoder + head, what one study costs);
  latency p50/p99 from host clock around each call (the calls return host arrays, so the
  GPU is synchronised inside each), throughput, and the speed-up over PyTorch eager on
  the CPU measured in the same run.

Runs with numpy, onnx and the backends' own packages only (``python -m engines.bench``),
so that it can run on a GPU machine that lacks the DICOM stack (give ``--inputs``).
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys
import time
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from engines.bundle import load_bundle
from engines.graph_io import read_io
from engines.gpu import cuda_gpus
from engines.options import EngineOptions, current, default_cache_dir
from engines.parity import Parity, compare, random_inputs
from engines.runtime import FP16_BACKENDS, EngineError, available_backends, card_allows_fp16, load_graph

ROLLOUT_PREFIX = "drlis_v1/qnet@rollout"  # as pipeline.engine_inputs writes them
GRAPHS = ("drlis_v1/qnet", "fused_kdamm_v1/image_encoder", "fused_kdamm_v1/head", "mmpkd_v1/image_student",
          "cropkd_v1/image_student", "cxr_fusion_v1/image_model")
REFERENCE = "pytorch"


@dataclass
class Timing:
    backend: str
    precision: str
    what: str
    p50_ms: float
    p99_ms: float
    per_s: float
    unit: str
    build_s: float


def save_inputs(path: Path, inputs: dict[str, dict[str, np.ndarray]]) -> None:
    np.savez_compressed(path, **{f"{g}:{k}": v for g, feeds in inputs.items() for k, v in feeds.items()})


def load_inputs(path: Path) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path) as z:
        for key in z.files:
            g, k = key.split(":", 1)
            out.setdefault(g, {})[k] = z[key]
    return out


def _onnx(graph: str) -> Path:
    bundle, net = graph.split("/")
    return load_bundle(bundle).path / f"{net}.onnx"


def _time(fn, runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def variants(backends: list[str]) -> list[tuple[str, str]]:
    """(backend, precision) pairs to run: fp32 everywhere, fp16 too where a backend can run it."""
    out = []
    for b in backends:
        out.append((b, "fp32"))
        if b in FP16_BACKENDS:
            out.append((b, "fp16"))
    return out


def run(backends: list[str], real: dict[str, dict[str, np.ndarray]], runs: int, options: EngineOptions,
        seed: int) -> tuple[list[Parity], list[Timing], list[str]]:
    parity: list[Parity] = []
    timings: list[Timing] = []
    notes: list[str] = []
    refs = {g: load_graph(_onnx(g), REFERENCE, options=options) for g in GRAPHS}
    rand = {g: random_inputs(read_io(_onnx(g)), 16, seed + i) for i, g in enumerate(GRAPHS)}
    ref_out = {(g, k): refs[g](**feeds) for g in GRAPHS for k, feeds in (("random", rand[g]), ("real", real[g]))}
    for backend, precision in variants(backends):
        opts = replace(options, precision=precision)
        engines = {}
        build_s = 0.0
        try:
            for g in GRAPHS:
                if precision == "fp16" and not card_allows_fp16(_onnx(g)):
                    opts_g = replace(opts, precision="fp32")
                else:
                    opts_g = opts
                t0 = time.perf_counter()
                engines[g] = load_graph(_onnx(g), backend, options=opts_g)
                build_s += time.perf_counter() - t0
        except EngineError as exc:
            notes.append(f"{backend} {precision}: {exc}")
            continue
        for g, eng in engines.items():
            if backend == REFERENCE and eng.precision == "fp32":
                continue  # the reference against itself proves nothing
            for kind, feeds in (("random", rand[g]), ("real", real[g])):
                parity.append(compare(g, backend, eng.precision, kind, eng(**feeds), ref_out[(g, kind)]))
        sel = engines["drlis_v1/qnet"]
        trace = [feeds for k, feeds in sorted(real.items()) if k.startswith(ROLLOUT_PREFIX)]
        if trace:
            def rollout() -> None:
                for feeds in trace:
                    sel(**feeds)

            xs = _time(rollout, runs, warmup=3)
            timings.append(Timing(backend, sel.precision, f"selector rollout ({len(trace)} steps)",
                                  1e3 * statistics.median(xs), 1e3 * _pct(xs, 0.99), 1 / statistics.median(xs),
                                  "volumes/s", build_s))
        states = real["drlis_v1/qnet"]
        n = next(iter(states.values())).shape[0]
        xs = _time(lambda: sel(**states), runs, warmup=5)
        timings.append(Timing(backend, sel.precision, f"selector batch {n} slices", 1e3 * statistics.median(xs),
                              1e3 * _pct(xs, 0.99), n / statistics.median(xs), "slices/s", build_s))
        enc, head = engines["fused_kdamm_v1/image_encoder"], engines["fused_kdamm_v1/head"]
        img = real["fused_kdamm_v1/image_encoder"]["image"][:1]
        h = {k: v[:1] for k, v in real["fused_kdamm_v1/head"].items()}

        def fused() -> None:
            emb = enc(image=img)["embedding"]
            head(**{**h, "embedding": emb})

        xs = _time(fused, runs * 4, warmup=10)
        timings.append(Timing(backend, f"{enc.precision}/{head.precision}", "fused batch 1",
                              1e3 * statistics.median(xs), 1e3 * _pct(xs, 0.99), 1 / statistics.median(xs),
                              "studies/s", build_s))
        for eng in engines.values():
            eng.close()
    return parity, timings, notes


def report(parity: list[Parity], timings: list[Timing], notes: list[str], runs: int) -> str:
    gpus = cuda_gpus()
    ref = {t.what: t.p50_ms for t in timings if t.backend == REFERENCE}
    lines = [f"host: {platform.node()} {platform.processor() or platform.machine()}, "
             f"GPU: {', '.join(f'{g.name} (cc {g.compute_capability})' for g in gpus) or 'none'}; "
             f"{dt.datetime.now().isoformat(timespec='minutes')}; {runs} timed runs per figure (selector), "
             f"{4 * runs} (fused)", "",
             "| backend | precision | workload | p50 ms | p99 ms | throughput | vs PyTorch eager (CPU) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for t in timings:
        ratio = ref.get(t.what, float("nan")) / t.p50_ms
        lines.append(f"| {t.backend} | {t.precision} | {t.what} | {t.p50_ms:.2f} | {t.p99_ms:.2f} | "
                     f"{t.per_s:,.0f} {t.unit} | {ratio:.2f}x |")
    lines += ["", "Parity against the PyTorch reference (CPU, fp32): tolerance |diff| <= atol + rtol |ref| "
              "(fp32 1e-4 + 1e-4, fp16 5e-2 + 2e-2); tol_used = worst element's share of it.", "", "```"]
    lines += [p.line() for p in parity]
    lines += ["```"]
    if notes:
        lines += ["", "Not run:"] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def summary(parity: list[Parity], timings: list[Timing]) -> str:
    first = next((t.what for t in timings if t.what.startswith("selector")), "")
    ref = next((t.p50_ms for t in timings if t.backend == REFERENCE and t.what == first), None)
    ort = next((t.p50_ms for t in timings if t.backend == "onnxruntime-cpu" and t.what == first), None)
    speed = f"{ref / ort:.2f}" if ref and ort else "n/a"
    bad = sum(not p.ok for p in parity)
    return (f"engines bench: backends={len({t.backend for t in timings})} parity_failures={bad} "
            f"selector_ort_cpu_vs_torch={speed}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="osteoscreen engines bench")
    add_arguments(p)
    return execute(p.parse_args(argv))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backends", help="comma-separated (default: every available one)")
    p.add_argument("--runs", type=int, default=30, help="timed runs per selector figure (fused: 4x)")
    p.add_argument("--inputs", type=Path, help="real inputs as saved by --save-inputs (default: computed from the "
                   "bundled CT, which needs the full install)")
    p.add_argument("--save-inputs", type=Path, help="write the real inputs here and exit")
    p.add_argument("--cache-dir", type=Path, help=f"TensorRT engine cache (default {default_cache_dir()})")
    p.add_argument("--output", type=Path, help="also write the report (markdown) here")
    p.add_argument("--seed", type=int, default=None, help="random-input seed (default: fresh)")


class InputsError(Exception):
    """A --inputs file that cannot be used; the message says which and what to do."""


def _read_inputs(path: Path) -> dict[str, dict[str, np.ndarray]]:
    try:
        real = load_inputs(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise InputsError(f"--inputs {path}: cannot be read ({getattr(exc, 'strerror', None) or exc}); write one "
                          f"with `osteoscreen engines bench --save-inputs FILE` on a full install") from None
    missing = [g for g in GRAPHS if g not in real]
    if missing:
        raise InputsError(f"--inputs {path}: no inputs for {missing}; write it again with "
                          f"`osteoscreen engines bench --save-inputs FILE`")
    return real


def not_run(backends: list[str], timings: list[Timing]) -> list[str]:
    """Requested backends with no figure: they could not load here (the notes say why)."""
    ran = {t.backend for t in timings}
    return [b for b in backends if b not in ran]


def execute(args: argparse.Namespace) -> int:
    """Exit status 0; 1 on a parity failure; 2 when a requested backend did not run (or bad arguments)."""
    if args.inputs:
        try:
            real = _read_inputs(args.inputs)
        except InputsError as exc:
            print(f"engines bench: {exc}", file=sys.stderr)
            return 2
    else:
        from pipeline.engine_inputs import real_inputs  # needs the full install (the bundled CT, the localiser)

        real = real_inputs()
        if args.save_inputs:
            try:
                save_inputs(args.save_inputs, real)
            except OSError as exc:
                print(f"engines bench: cannot write {args.save_inputs}: {exc.strerror or exc}", file=sys.stderr)
                return 2
            print(f"real inputs written to {args.save_inputs}")
            return 0
    options = current()
    if args.cache_dir:
        options = replace(options, cache_dir=args.cache_dir)
    avail = [b for b in available_backends() if b != "triton" or options.triton_url]
    backends = args.backends.split(",") if args.backends else avail
    if REFERENCE not in avail:
        print("engines bench needs torch (the PyTorch reference)", file=sys.stderr)
        return 2
    if REFERENCE not in backends:
        backends = [REFERENCE, *backends]
    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**31)
    parity, timings, notes = run(backends, real, args.runs, options, seed)
    text = report(parity, timings, notes, args.runs) + f"\nrandom-input seed: {seed}\n"
    print(text)
    unwritten = False
    if args.output:
        try:
            args.output.write_text(text, encoding="utf-8")
        except OSError as exc:
            print(f"engines bench: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
            unwritten = True
    missing = not_run(backends, timings)
    if missing:
        print(f"engines bench: requested backend(s) did not run: {', '.join(missing)} (the report's \"Not run\" "
              f"says why; `osteoscreen engines list` shows what runs here)", file=sys.stderr)
    print(summary(parity, timings))
    if not all(p.ok for p in parity):
        return 1
    return 2 if missing or unwritten else 0


if __name__ == "__main__":
    sys.exit(main())
