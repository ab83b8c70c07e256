"""``osteoscreen engines ...``: which backends run here, pre-building TensorRT engines, benchmarks, Triton export."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import engines
from config.schema import Settings
from engines.bundle import BundleError, resolve_bundle_path


BUNDLE_ROLES = (  # (setting, what it must be: card kinds)
    ("screening.model", ("fused-kd-student",)),
    ("screening.attenuation_rule", ("threshold-rule",)),
    ("screening.selector", ("slice-selector-dqn",)),
    ("screening.image_only_model", ("image_only_screening",)),
    ("xray.model", ("chest_radiograph_screening",)),
)


def check_configured_bundles(s: Settings) -> list[str]:
    """Every configured bundle exists, loads, and is of the kind its setting needs: one line per problem.

    A wrong name or a bundle in the wrong place (say a selector as the image-only model) would otherwise stop
    the service at start-up or fail every job; ``osteoscreen config check`` and the service's start both ask."""
    from engines.bundle import load_bundle

    problems = []
    for setting, kinds in BUNDLE_ROLES:
        section, key = setting.split(".")
        if section == "xray" and not s.xray.enabled:
            continue
        name = getattr(getattr(s, section), key)
        if not name:
            continue
        try:
            kind = load_bundle(name).card.kind
        except BundleError as exc:
            problems.append(f"{setting} = {name!r}: {exc}")
            continue
        if kind not in kinds:
            problems.append(f"{setting} = {name!r} is a {kind!r} bundle; this setting needs {' or '.join(kinds)}")
    return problems


def configured_bundles(s: Settings) -> list[str]:
    """Every bundle the configuration runs: the fused model, selector, image-only student, chest radiograph model."""
    return [s.screening.model] + [b for b in (s.screening.selector, s.screening.image_only_model,
                                              s.xray.model if s.xray.enabled else "") if b]


def configured_graphs(s: Settings) -> list[Path]:
    """Every network the configured bundles run (BundleError for a bundle that is not there)."""
    return [p for b in configured_bundles(s) for p in sorted(resolve_bundle_path(b).glob("*.onnx"))]


def _graphs_or_report(s: Settings, command: str) -> list[Path] | None:
    """configured_graphs, or None after one line on stderr (no traceback) for a missing bundle."""
    try:
        return configured_graphs(s)
    except BundleError as exc:
        print(f"engines {command}: {exc}", file=sys.stderr)
        return None


def list_backends(s: Settings) -> int:
    from dicom_node.service import engine_options
    from engines.gpu import cuda_gpus

    opts = engine_options(s)
    gpus = cuda_gpus()
    print(f"GPU: {', '.join(f'{g.name} (compute capability {g.compute_capability})' for g in gpus) or 'none'}")
    print(f"available backends: {', '.join(engines.available_backends()) or 'none'}")
    print(f"configured backend: {s.screening.backend}; precision {opts.precision}; TensorRT cache {opts.cache_dir}")
    graphs = _graphs_or_report(s, "list")
    if graphs is None:
        return 2
    status = 0
    for onnx_path in graphs:
        try:
            eng = engines.load_graph(onnx_path, s.screening.backend, options=opts)
        except engines.EngineError as exc:
            print(f"  {onnx_path.parent.name}/{onnx_path.stem}: {exc}")
            status = 2
            continue
        print(f"  {onnx_path.parent.name}/{onnx_path.stem}: {eng.backend} on {eng.device}, {eng.precision}")
        eng.close()
    return status


def build(s: Settings, backend: str) -> int:
    """Build (or verify the cached) engine of every configured network, so no job pays the build."""
    from dicom_node.service import engine_options

    opts = engine_options(s)
    graphs = _graphs_or_report(s, "build")
    if graphs is None:
        return 2
    status = 0
    for onnx_path in graphs:
        t0 = time.perf_counter()
        try:
            eng = engines.load_graph(onnx_path, backend, options=opts)
        except engines.EngineError as exc:
            print(f"engines build: {onnx_path.parent.name}/{onnx_path.stem}: {exc}", file=sys.stderr)
            status = 2
            continue
        sess = eng._session
        how = ("built" if getattr(sess, "built", False) else "cached") if backend == "tensorrt" else "loaded"
        where = f" -> {sess.cache_path}" if hasattr(sess, "cache_path") else ""
        print(f"{onnx_path.parent.name}/{onnx_path.stem}: {eng.backend} {eng.precision} {how} in "
              f"{time.perf_counter() - t0:.1f} s{where}")
        eng.close()
    return status


def export_triton(s: Settings, out_dir: Path, cpu: bool) -> int:
    """Write the Triton model repository; a DIR that cannot be written or a bundle that fails its check is one
    line on stderr and exit status 2."""
    from engines.triton_repo import export_repository

    if out_dir.exists() and not out_dir.is_dir():
        print(f"engines export-triton: {out_dir} exists and is not a directory: give a new or empty directory",
              file=sys.stderr)
        return 2
    try:
        dirs = export_repository(out_dir, configured_bundles(s), max_batch=s.engines.max_batch, gpu=not cpu)
    except OSError as exc:
        print(f"engines export-triton: cannot write {exc.filename or out_dir}: {exc.strerror or exc}; give a "
              f"directory this user can create and write", file=sys.stderr)
        return 2
    except BundleError as exc:
        print(f"engines export-triton: {exc}", file=sys.stderr)
        return 2
    for d in dirs:
        print(f"{d}")
    print(f"Triton model repository: {len(dirs)} models in {out_dir}; serve it with "
          f"`tritonserver --model-repository {out_dir}` and set [engines] triton_url, "
          f"[screening] backend = \"triton\"")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from engines.bench import add_arguments

    p = sub.add_parser("engines", help="inference backends: list, build TensorRT engines, bench, export-triton")
    p.add_argument("action", choices=["list", "build", "bench", "export-triton"])
    p.add_argument("dir", nargs="?", type=Path, help="export-triton: the model repository to write")
    p.add_argument("--config", type=Path, help="node configuration ([screening], [engines])")
    p.add_argument("--backend", default="tensorrt", help="build: the backend to build for (default tensorrt)")
    p.add_argument("--cpu", action="store_true", help="export-triton: instances on the server's CPU")
    add_arguments(p)
