"""Command line: `osteoscreen serve | demo | config check`."""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
from pathlib import Path

from config import ConfigError, default_toml, load_settings
from dicom_node import __version__


def _settings(path):
    """Validated settings, or None after printing the error (file, line and key) to stderr."""
    try:
        return load_settings(path)
    except ConfigError as exc:
        print(f"osteoscreen: {exc}", file=sys.stderr)
        return None


# What the node and its admin commands create (databases, instances, results, backups) holds PHI: never
# readable by other users, whatever umask the shell or a unit without UMask= gives (the shipped unit sets 0027).
STATE_UMASK = 0o027


def _private_umask() -> None:
    os.umask(os.umask(STATE_UMASK) | STATE_UMASK)  # keeps any stricter bits the caller already had


def _serve(args: argparse.Namespace) -> int:
    _private_umask()
    settings = _settings(args.config)
    if settings is None:
        return 2
    from dicom_node.logfmt import configure

    configure(settings.logging.level, settings.logging.format)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # pynetdicom and APScheduler log every C-STORE at INFO: two lines per instance on the ingest path
        for chatty in ("pynetdicom", "apscheduler"):
            logging.getLogger(chatty).setLevel(logging.WARNING)
    from dicom_node.service import Service

    from engines.bundle import BundleError
    from engines.runtime import EngineError
    from hl7.mapping import MappingError
    from hl7.tls import TLSConfigError

    try:
        service = Service(settings)
    except (BundleError, EngineError, TLSConfigError, MappingError, ConfigError) as exc:
        # a configuration error: exit status 2, which the unit's RestartPreventExitStatus= does not restart (a
        # restart loop would only repeat it)
        print(f"osteoscreen: cannot start: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - start-up problems are operator errors: say what and where
        print(f"osteoscreen: cannot start: {exc}", file=sys.stderr)
        return 1
    from dicom_node.receiver_pool import ReceiverStartError

    try:
        service.serve_forever(args.config)
    except ReceiverStartError as exc:
        print(f"osteoscreen: cannot start: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"osteoscreen: {exc}", file=sys.stderr)
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    from dicom_node.demo import run_demo

    return run_demo(output=args.output, workdir=args.workdir)


def _train_selector(args: argparse.Namespace) -> int:
    from engines.bundle import bundled_models_dir
    from pipeline.training.drlis import SelectorTrainConfig, quick_config, train

    if args.cases is None:
        print("train selector needs CASES_DIR: real labelled CT cases in the eval imaging format "
              "(CASES_DIR/<case>/{ct.nii.gz|dicom/} + labels.nii.gz)", file=sys.stderr)
        return 2
    cfg = quick_config(args.seed) if args.quick else SelectorTrainConfig(seed=args.seed)
    if args.check:
        import json

        def retrain(tmp: Path) -> dict:
            train(cfg, args.cases, tmp, tmp.parent / "report", log=lambda *a: None)
            return _selector_metrics(json.loads((tmp / "card.json").read_text()))

        return _check_reproduced(bundled_models_dir() / "drlis_v1", retrain, shipped_metrics=_selector_metrics)
    out = Path(args.out) if args.out else bundled_models_dir() / "drlis_v1"
    report = Path(args.report) if args.report else Path.cwd() / "docs" / "training"
    s = train(cfg, args.cases, out, report)
    v = s["final_validation"]
    print(f"bundle written to {out}; reward curves and metrics in {report} (drlis_curves.png, drlis_metrics.json)")
    print(f"train selector ok: episodes={s['episodes']} volumes={s['train_volumes']} "
          f"val_median_mm={v['median_mm']:.1f} val_in_L1={v['in_zone']:.2f} seed={cfg.seed}")
    return 0


def _selector_metrics(card: dict) -> dict:
    """What a DRLIS retrain must reproduce: the episode count and final validation in its card, not the timings."""
    return {"episodes": card["training"]["episodes"], "validation": card["training"]["validation"]}


def _retrain(args: argparse.Namespace, cfg, bundle: str, run, report_note: str, result_lines) -> int:
    """What the bundle-training commands share: --check (retrain in a temporary folder and compare), --out and
    --report, then the bundle line and the command's own result lines (``result_lines(results) -> [str]``)."""
    from engines.bundle import bundled_models_dir

    shipped = bundled_models_dir() / bundle
    if args.check:
        return _check_reproduced(shipped, lambda tmp: run(cfg, tmp, None)["results"])
    out = Path(args.out) if args.out else shipped
    report = Path(args.report) if args.report else Path.cwd() / "docs" / "training"
    results = run(cfg, out, report)["results"]
    print(f"bundle written to {out}; report in {report}{report_note}")
    for line in result_lines(results):
        print(line)
    return 0


def _train_privileged(args: argparse.Namespace) -> int:
    from pipeline.training.privileged import PrivilegedConfig, run

    cfg = PrivilegedConfig(seed=args.seed)
    if args.quick:
        cfg.limit, cfg.teacher_epochs, cfg.student_epochs, cfg.folds, cfg.bootstrap = 2000, 2, 2, 2, 100

    def lines(r: dict) -> list[str]:
        d = r["pkd_minus_plain"]
        return [f"train privileged ok: auc_pkd={r['auc_pkd'][0]:.3f} auc_labels_only={r['auc_plain'][0]:.3f} "
                f"diff={d[0]:+.3f} ci={d[1]:+.3f}..{d[2]:+.3f} seed={cfg.seed}"]

    return _retrain(args, cfg, "mmpkd_v1", run, " (privileged.md)", lines)


def _train_cropkd(args: argparse.Namespace) -> int:
    from pipeline.training.cropkd import CropKDConfig, run

    cfg = CropKDConfig(seed=args.seed)
    if args.quick:
        cfg.limit, cfg.teacher_epochs, cfg.student_epochs, cfg.bootstrap = 1500, 2, 2, 100

    def lines(r: dict) -> list[str]:
        ins = r["attention_inside_body"]
        return [f"train cropkd ok: auc_student={r['auc_student'][0]:.3f} "
                f"auc_kd_only={r['auc_student_kd_only'][0]:.3f} auc_teacher={r['auc_teacher_crop'][0]:.3f} "
                f"inside_body={ins['student_attention_loss'][0]:.3f} "
                f"inside_body_kd_only={ins['student_kd_only'][0]:.3f} seed={cfg.seed}"]

    return _retrain(args, cfg, "cropkd_v1", run, " (cropkd.md)", lines)


def _train_xray(args: argparse.Namespace) -> int:
    from pipeline.training.xray import XrayConfig, run

    cfg = XrayConfig(seed=args.seed)
    if args.quick:
        cfg.limit, cfg.epochs, cfg.bootstrap = 1500, 2, 100

    def lines(r: dict) -> list[str]:
        return [f"train xray ok: auc_fused={r['auc_fused'][0]:.3f} auc_image={r['auc_image'][0]:.3f} "
                f"auc_tabular={r['auc_tabular'][0]:.3f} weight_image={r['fusion_weight_image']:.2f} "
                f"experimental=yes seed={cfg.seed}"]

    return _retrain(args, cfg, "cxr_fusion_v1", run, " (xray.md) - EXPERIMENTAL, semi-synthetic images", lines)


def _train_splits(args: argparse.Namespace) -> int:
    from pipeline.training.repeated_splits import SplitsConfig, run

    cfg = SplitsConfig(splits=args.splits, students=args.students)
    if args.quick:
        cfg.limit, cfg.teacher_epochs, cfg.student_epochs = 2000, 3, 2
        cfg.splits, cfg.students = min(cfg.splits, 3), min(cfg.students, 2)
    report = Path(args.report) if args.report else Path.cwd() / "docs" / "training"
    summary = run(cfg, report)
    print(f"report in {report / 'repeated_splits.md'} (no bundle written)")
    print(summary["line"])
    return 0


def _check_reproduced(shipped: Path, retrain, shipped_metrics=lambda card: card["metrics"]) -> int:
    """Retrain into a temporary folder (``retrain(bundle_dir) -> results``); compare with the shipped card's
    metrics (``shipped_metrics(card)``) to 3 decimals. Nothing shipped is written."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rebuilt = retrain(Path(tmp) / "bundle")
    diffs = _compare_metrics(shipped_metrics(json.loads((shipped / "card.json").read_text())), rebuilt)
    if diffs:
        print("train check: metrics differ from the shipped bundle at 3 decimals:\n  " + "\n  ".join(diffs))
        return 1
    print("train check: the shipped bundle's metrics are reproduced (3 decimals)")
    return 0


# Training commands run with fixed CPU kernels (pipeline/training/kernels.py), so that --check holds whichever
# vector kernels an x86-64 CPU would pick. The DRLIS selector is left out: its exploration is not reproducible
# across machines anyway (docs/validation.md).
PINNED_TRAINING = ("fused", "xray", "privileged", "cropkd", "splits")


def _train(args: argparse.Namespace) -> int:
    from pipeline.training.kernels import is_pinned, rerun_pinned

    if args.what == "splits" and (args.splits < 2 or not 0 <= args.students <= args.splits or args.students == 1):
        print("train splits needs --splits 2 or more and --students 0, or 2 up to --splits", file=sys.stderr)
        return 2
    if args.what == "splits" and (args.check or args.out):
        print("train splits writes a report only: --check and --out do not apply (use --report)", file=sys.stderr)
        return 2
    if args.what in PINNED_TRAINING and not is_pinned():
        return rerun_pinned(args.argv)
    if args.what == "selector":
        return _train_selector(args)
    if args.what == "privileged":
        return _train_privileged(args)
    if args.what == "cropkd":
        return _train_cropkd(args)
    if args.what == "xray":
        return _train_xray(args)
    if args.what == "splits":
        return _train_splits(args)

    from pipeline.training.train import TrainConfig, run

    cfg = TrainConfig(seed=args.seed)
    if args.quick:
        cfg.limit, cfg.teacher_epochs, cfg.student_epochs, cfg.bootstrap = 2000, 3, 3, 100

    def lines(r: dict) -> list[str]:
        subsets = [f"  {s:20s} n={v['n']:5d} AUC {v['auc']:.3f} ({v['auc_ci'][0]:.3f}-{v['auc_ci'][1]:.3f}) "
                   f"sens {v['sensitivity']:.2f} spec {v['specificity']:.2f}  "
                   f"no-KD AUC {r['ablation_kd'][s]['auc_no_kd']:.3f}" for s, v in r["subsets"].items()]
        return subsets + [f"train ok: tabular teacher AUC {r['teachers']['tabular']['auc'][0]:.3f}, "
                          f"OST {r['baselines']['ost']['auc'][0]:.3f}, "
                          f"logreg {r['baselines']['logreg']['auc'][0]:.3f}, "
                          f"student all {r['subsets']['all']['auc']:.3f}"]

    return _retrain(args, cfg, "fused_kdamm_v1", run, "", lines)


def _compare_metrics(a, b, path: str = "") -> list[str]:
    out: list[str] = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            out += _compare_metrics(a.get(k), b.get(k), f"{path}.{k}" if path else k)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            out += _compare_metrics(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        if a is None or b is None or round(float(a), 3) != round(float(b), 3):
            out.append(f"{path}: shipped {a} vs rebuilt {b}")
    elif a != b:
        out.append(f"{path}: shipped {a!r} vs rebuilt {b!r}")
    return out


def _eval(args: argparse.Namespace) -> int:
    if args.what == "imaging":
        from pipeline.validation import run_eval

        run_eval(args.dir, with_variants=args.variants, crop_sweep=args.crop_sweep)
        return 0
    if args.what == "selector":
        from pipeline.drlis.evaluate import run_selector_eval

        run_selector_eval(args.dir, with_variants=args.variants, bundle=args.selector)
        return 0
    if args.what == "attention":
        from pipeline.attention_eval import run_attention_eval

        run_attention_eval(args.dir, bundle=args.image_only, with_variants=args.variants)
        return 0
    if args.what == "tabular":
        from pipeline.training.evaluate import eval_tabular

        eval_tabular(args.dir, bundle=args.bundle)
        return 0
    return 2


def _hl7(args: argparse.Namespace) -> int:
    from hl7 import tools

    if args.action == "bench":
        tools.bench()
        return 0
    settings = _settings(args.config)
    if settings is None:
        return 2
    store = Path(settings.node.state_dir) / "labs.sqlite"
    if args.action == "send":
        if not args.arg:
            print("osteoscreen hl7 send FILE", file=sys.stderr)
            return 2
        return tools.send_file(Path(args.arg), args.host or settings.hl7.host, args.port or settings.hl7.port,
                               tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key)
    if args.action == "query":
        if not args.arg:
            print("osteoscreen hl7 query PATIENT_ID [--issuer AUTHORITY]", file=sys.stderr)
            return 2
        from hl7.privacy import PatientKeyError
        from hl7.privacy import configure as configure_patient_key

        try:  # the query's log lines carry the same pk-... keys as the node's
            configure_patient_key(Path(settings.node.state_dir), create=False)
        except PatientKeyError:
            pass  # no node has run on this state yet: a temporary key (said in the log)
        return tools.query_lis(settings, args.arg, args.issuer, args.window_days or settings.labs.window_days)
    if not store.exists():
        print(f"osteoscreen: no lab store at {store}", file=sys.stderr)
        return 2
    if args.action == "labs":
        if not args.arg:
            print("osteoscreen hl7 labs PATIENT_ID", file=sys.stderr)
            return 2
        return tools.show_labs(store, args.arg, args.issuer, args.window_days or settings.labs.window_days,
                               labs=settings.labs)
    return tools.show_errors(store)


def _os_error(exc: OSError) -> str:
    """One line for a file the command could not read or write: what, where, and what to check."""
    where = f": {exc.filename}" if exc.filename else ""
    return (f"{exc.strerror or exc}{where} (check the path: a folder where a file is expected or the reverse, "
            "a missing parent, or permissions)")


def _admin(args: argparse.Namespace) -> int:
    import sqlite3

    from dicom_node.migrations import SchemaTooNew

    _private_umask()
    try:
        return _admin_command(args)
    except FileNotFoundError as exc:
        print(f"osteoscreen: {exc if exc.strerror is None else _os_error(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # an output path that is a folder, under a file, or not writable
        print(f"osteoscreen: {_os_error(exc)}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"osteoscreen: {exc}", file=sys.stderr)
        return 2
    except (sqlite3.DatabaseError, SchemaTooNew) as exc:  # damaged, locked past the timeout, or a newer release's
        print(f"osteoscreen: {exc}", file=sys.stderr)
        return 1


def _admin_command(args: argparse.Namespace) -> int:
    from dicom_node import admin

    if args.command == "echo":
        return admin.echo(args.target, args.aet)
    settings = _settings(args.config)
    if settings is None:
        return 2
    state = Path(settings.node.state_dir)
    if args.command == "status":
        return admin.status(state)
    if args.command == "jobs":
        return admin.jobs(state, args.action, args.job_id)
    if args.command == "worklist":
        return admin.worklist(state, settings.worklist, args.date, shadow=settings.shadow.enabled)
    if args.command == "predictions":
        return admin.predictions(state, args.out, args.since)
    if args.command == "backup":
        return admin.backup(state, args.dest)
    if args.command == "restore":
        return admin.restore(state, args.backup_dir)
    if args.command == "patient-key":
        return admin.patient_key(state, args.patient_id, args.issuer)
    if args.command == "purge":
        days = settings.retention.instances_days if args.days is None else args.days
        return admin.purge(state, days, args.dry_run)
    return admin.outbox(state, args.action)


def _start_checks(s) -> str | None:
    """The checks `serve` makes at start that a file can fail: the models load on the configured backend (a
    forced GPU backend on a machine without one), every TLS key and certificate loads (an encrypted key whose
    password variable is not set). None when they pass."""
    from dicom_node.service import check_models, engine_options
    from engines import configure
    from hl7.tls import client_context, server_context

    try:
        configure(engine_options(s))
        check_models(s)
    except Exception as exc:  # noqa: BLE001 - BundleError, EngineError: the reason is the message
        return f"models: {exc}"
    for key, directory in (("[node] state_dir", s.node.state_dir), ("[worklist] directory", s.worklist.directory),
                           ("[engines] cache_dir", s.engines.cache_dir)):
        problem = _not_a_directory(Path(directory)) if directory else None
        if problem:
            return f"{key} = {directory}: {problem}"
    for key, tls, make in (("[node.tls]", s.node.tls, server_context), ("[hl7.tls]", s.hl7.tls, server_context),
                           ("[lis_query.tls]", s.lis_query.tls, client_context),
                           ("[followup.tls]", s.followup.tls, client_context)):
        try:
            make(tls)
        except Exception as exc:  # noqa: BLE001 - ssl errors, a missing password variable
            return f"{key}: {exc}"
    return None


def _not_a_directory(directory: Path) -> str | None:
    """Why ``directory`` can never be made a directory (it, or the nearest part of its path that exists, is a
    file), whoever runs the service; None otherwise. Whether the service user may write there is checked by
    `serve` itself at start, as that user."""
    path = directory.expanduser().absolute()
    for part in (path, *path.parents):
        if part.exists():
            return None if part.is_dir() else f"{part} is not a directory"
    return None


_PATH_SUFFIXES = ("_dir", "_file", "directory", "_path")


def relative_paths(settings) -> list[str]:
    """Settings holding a relative path: `serve` resolves them against its working directory, which under
    systemd is / (so a check run from elsewhere can pass where the service then fails)."""
    from pydantic import BaseModel

    found: list[str] = []

    def walk(model: BaseModel, where: str) -> None:
        for name in type(model).model_fields:
            value = getattr(model, name)
            key = f"{where}.{name}" if where else name
            if isinstance(value, BaseModel):
                walk(value, key)
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, BaseModel):
                        walk(item, f"{key}[{i}]")
            elif isinstance(value, (str, Path)) and str(value):
                text = str(value)
                pathlike = name.endswith(_PATH_SUFFIXES) or (name in ("model", "selector", "image_only_model",
                                                                      "attenuation_rule") and "/" in text)
                if pathlike and not Path(text).expanduser().is_absolute():
                    found.append(f"{key} = {text!r} is a relative path: `serve` resolves it against its working "
                                 "directory (/ under systemd); give an absolute path")

    walk(settings, "")
    return found


def _config(args: argparse.Namespace) -> int:
    if args.action == "default":
        sys.stdout.write(default_toml())
        return 0
    s = _settings(args.file)
    if s is None:
        return 2
    from dicom_node.engines_cli import check_configured_bundles

    problems = check_configured_bundles(s)
    if problems:
        print(f"{args.file}: model bundles:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    from hl7.mapping import load_mapping
    from pipeline.fused import lab_unit_problems

    problems = lab_unit_problems(load_mapping(s.labs.mapping_file))
    if problems:
        print(f"{args.file}: lab mapping table against the model:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    problem = _start_checks(s)  # what `serve` checks at start beyond the file itself
    if problem:
        print(f"{args.file}: {problem}", file=sys.stderr)
        return 2
    for warning in relative_paths(s):
        print(f"{args.file}: warning: {warning}", file=sys.stderr)
    print(f"{args.file}: OK (AE {s.node.ae_title} on {s.node.host}:{s.node.port}, "
          f"{len(s.destinations)} destination(s), state in {s.node.state_dir})")
    return 0


def _engines(args: argparse.Namespace) -> int:
    from dicom_node import engines_cli
    from dicom_node.service import engine_options
    from engines import configure
    from engines.bench import execute

    settings = _settings(args.config)
    if settings is None:
        return 2
    configure(engine_options(settings))
    if args.action == "list":
        return engines_cli.list_backends(settings)
    if args.action == "build":
        return engines_cli.build(settings, args.backend)
    if args.action == "bench":
        return execute(args)
    if args.dir is None:
        print("error: engines export-triton needs DIR", file=sys.stderr)
        return 2
    return engines_cli.export_triton(settings, args.dir, args.cpu)


def _bench(args: argparse.Namespace) -> int:
    from dicom_node.bench import BenchError, run_bench

    if args.runs < 1 or args.slices < 40:
        print("error: --runs must be >= 1 and --slices >= 40 (the routing minimum)", file=sys.stderr)
        return 2
    try:
        scaling = tuple(int(x) for x in args.scaling.split(",") if x.strip())
    except ValueError:
        print(f"error: --scaling takes comma-separated slice counts, not {args.scaling!r}", file=sys.stderr)
        return 2
    try:
        run_bench(runs=args.runs, slices=args.slices, scaling=scaling, workdir=args.workdir,
                  output=None if str(args.output) == "-" else args.output)
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="osteoscreen", description="Opportunistic osteoporosis screening DICOM node "
                                "(research use only).")
    p.add_argument("--version", action="version", version=f"osteoscreen {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the node")
    s.add_argument("--config", type=Path, help="TOML configuration file (default: embedded defaults)")
    s.set_defaults(func=_serve)
    d = sub.add_parser("demo", help="run the whole path once on loopback with the bundled real CT")
    d.add_argument("--output", type=Path, help="also leave sr.dcm, sc.dcm and sc.png here")
    d.add_argument("--workdir", type=Path, help="working directory (default: a new temporary one)")
    d.set_defaults(func=_demo)
    t = sub.add_parser("train", help="rebuild a model bundle (seeded) and its training report: the fused screening "
                       "model (default), the DRLIS slice selector, the privileged image-only student or the "
                       "crop-teacher full-slice student, or the EXPERIMENTAL chest radiograph model; `splits` "
                       "compares the fused model's tabular teacher with its baselines over repeated participant "
                       "splits (a report, no bundle)")
    t.add_argument("what", nargs="?", choices=["fused", "selector", "privileged", "cropkd", "xray", "splits"],
                   default="fused")
    t.add_argument("cases", nargs="?", type=Path, help="selector: CASES_DIR of real labelled CT (eval imaging format)")
    t.add_argument("--seed", type=int, default=20261123)
    t.add_argument("--out", help="bundle directory (default: the shipped engines/models/fused_kdamm_v1)")
    t.add_argument("--report", help="report directory (default: ./docs/training)")
    t.add_argument("--check", action="store_true", help="retrain in a temporary folder and compare the metrics "
                   "with the shipped bundle to 3 decimals")
    t.add_argument("--quick", action="store_true", help="small slice and few epochs (smoke test)")
    t.add_argument("--splits", type=int, default=20, help="splits: how many participant splits (default 20)")
    t.add_argument("--students", type=int, default=6, help="splits: also train the KD student on this many of "
                   "them and compare it with the teacher (default 6, about 6 min each; 0: teacher and baselines only)")
    t.set_defaults(func=_train)
    e = sub.add_parser("eval", help="evaluate on data the model never saw")
    e.add_argument("what", choices=["tabular", "imaging", "selector", "attention"])
    e.add_argument("dir", type=Path, help="tabular: folder of NHANES files <TABLE>_<SUFFIX>.csv.xz; imaging: "
                   "CASES_DIR/<case>/{ct.nii.gz|dicom/} + labels.nii.gz")
    e.add_argument("--variants", action="store_true", help="imaging: also run robustness variants of each case")
    e.add_argument("--crop-sweep", action="store_true", help="imaging: also cut each case from the top and from "
                   "the bottom every 6 mm (a scan may start or end anywhere); its own summary line")
    e.add_argument("--bundle", default="fused_kdamm_v1")
    e.add_argument("--selector", default="drlis_v1", help="selector: the DRLIS bundle to evaluate")
    e.add_argument("--image-only", default="cropkd_v1", help="attention: the full-slice student bundle")
    e.set_defaults(func=_eval)
    h = sub.add_parser("hl7", help="HL7 interface tools for IT")
    h.add_argument("action", choices=["send", "labs", "query", "errors", "bench"])
    h.add_argument("arg", nargs="?", help="send: message file; labs, query: patient ID")
    h.add_argument("--config", type=Path, help="node configuration (state dir, HL7 port)")
    h.add_argument("--host")
    h.add_argument("--port", type=int)
    h.add_argument("--issuer", help="labs: assigning authority of the patient ID")
    h.add_argument("--window-days", type=int)
    h.add_argument("--tls-ca", type=Path, help="send: connect with TLS, trusting this CA (PEM)")
    h.add_argument("--tls-cert", type=Path, help="send: client certificate for mutual TLS (PEM)")
    h.add_argument("--tls-key", type=Path, help="send: key of --tls-cert")
    h.set_defaults(func=_hl7)
    st = sub.add_parser("status", help="queues, last errors and skipped series of a node")
    st.add_argument("--config", type=Path)
    st.set_defaults(func=_admin)
    j = sub.add_parser("jobs", help="list, show, retry or cancel screening jobs")
    j.add_argument("action", choices=["list", "show", "retry", "cancel"])
    j.add_argument("job_id", type=int, nargs="?")
    j.add_argument("--config", type=Path)
    j.set_defaults(func=_admin)
    o = sub.add_parser("outbox", help="list results waiting for delivery, or make them due now")
    o.add_argument("action", choices=["list", "retry"])
    o.add_argument("--config", type=Path)
    o.set_defaults(func=_admin)
    wl = sub.add_parser("worklist", help="write the positive-screen worklist now (the 24 h before DATE at the "
                        "configured time; default today)")
    wl.add_argument("--date", type=dt.date.fromisoformat, help="YYYY-MM-DD")
    wl.add_argument("--config", type=Path)
    wl.set_defaults(func=_admin)
    pr = sub.add_parser("predictions", help="every result as CSV (patient IDs included, file 0600) for comparison "
                        "with the site's DXA, e.g. after a shadow-mode validation period")
    pr.add_argument("--out", type=Path, required=True)
    pr.add_argument("--since", type=dt.date.fromisoformat, help="YYYY-MM-DD (default: all)")
    pr.add_argument("--config", type=Path)
    pr.set_defaults(func=_admin)
    bk = sub.add_parser("backup", help="consistent copy of the state databases (safe while the node runs)")
    bk.add_argument("--dest", type=Path, help="folder for the timestamped copy (default: <state_dir>/backups)")
    bk.add_argument("--config", type=Path)
    bk.set_defaults(func=_admin)
    rs = sub.add_parser("restore", help="put a backup's databases back (the node stopped): checks them, keeps the "
                        "replaced files as NAME.replaced-STAMP, never replays an old -wal")
    rs.add_argument("backup_dir", type=Path, help="an osteoscreen-YYYYMMDDTHHMMSS folder made by `osteoscreen backup`")
    rs.add_argument("--config", type=Path)
    rs.set_defaults(func=_admin)
    pk = sub.add_parser("patient-key", help="the log key (pk-...) of a known patient ID, to find that patient's log "
                        "lines (keyed with this site's secret in the state directory)")
    pk.add_argument("patient_id")
    pk.add_argument("--issuer", help="assigning authority of the patient ID (IssuerOfPatientID, PID-3.4)")
    pk.add_argument("--config", type=Path)
    pk.set_defaults(func=_admin)
    pg = sub.add_parser("purge", help="apply the retention rule now: delete received CT screened (or skipped) "
                        "and delivered over [retention] instances_days ago")
    pg.add_argument("--days", type=float, help="override instances_days")
    pg.add_argument("--dry-run", action="store_true", help="only report what would be deleted")
    pg.add_argument("--config", type=Path)
    pg.set_defaults(func=_admin)
    ec = sub.add_parser("echo", help="C-ECHO a DICOM peer: AE@host:port")
    ec.add_argument("target")
    ec.add_argument("--aet", default="OSTEOSCREEN", help="calling AE title")
    ec.set_defaults(func=_admin)
    b = sub.add_parser("bench", help="benchmark ingest, study latency, memory and scaling against DCMTK and "
                       "Orthanc on loopback; writes docs/benchmarks.md")
    b.add_argument("--runs", type=int, default=5, help="runs per figure; the median is reported (default 5)")
    b.add_argument("--slices", type=int, default=300, help="slices of the 512 x 512 test series (default 300)")
    b.add_argument("--scaling", default="100,300,600,1000", help="slice counts for the scaling table ('' for none)")
    b.add_argument("--workdir", type=Path, help="keep series and run folders here (default: a temporary folder)")
    b.add_argument("--output", type=Path, default=Path("docs/benchmarks.md"), help="report file ('-' for none)")
    b.set_defaults(func=_bench)
    from dicom_node.engines_cli import add_parser as add_engines_parser

    add_engines_parser(sub)
    sub.choices["engines"].set_defaults(func=_engines)
    c = sub.add_parser("config", help="configuration tools")
    c.add_argument("action", choices=["check", "default"])
    c.add_argument("file", type=Path, nargs="?")
    c.set_defaults(func=_config)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.argv = argv
    if args.command == "config" and args.action == "check" and not args.file:
        p.error("config check needs a FILE")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
