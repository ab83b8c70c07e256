"""`osteoscreen train splits`: the tabular teacher against its baselines over repeated participant splits.

The held-out split of `osteoscreen train` has 78 positives. An AUC difference of a few thousandths between
the tabular teacher and the logistic regression is within that split's noise in either direction, so one
split cannot say whether the teacher is at least as good. This analysis refits the teacher's candidate
families (the same ``fit_teacher_members``, hyperparameters and real NHANES cohort), the logistic regression
and OST on further participant splits (seeds ``first_seed``.., the same stratified 70/15/15 scheme) and
compares them on each split's held-out part.

The splits share participants, so the spread of the per-split differences understates the uncertainty; the
interval is the corrected resampled t (Nadeau C, Bengio Y. Inference for the generalization error. Machine
Learning 2003;52:239-281): variance x (1/k + n_test/n_train). No bundle is written.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import t as student_t
from tqdm.auto import tqdm

from pipeline.training import metrics as M
from pipeline.training.export import kernels_line
from pipeline.training.kernels import apply_runtime_pins
from pipeline.training.nhanes import LABEL_RULE, split_participants
from sklearn.model_selection import StratifiedKFold

from pipeline.training.train import (TEACHER_CANDIDATES, TEACHER_TEXT, Data, TrainConfig, _image_logits, _seed_all,
                                     fit_teacher_members, logreg_score, ost_score, prepare, student_logits,
                                     subset_rows_and_mask, train_image_teacher, train_student)

SPLIT_FRACTIONS = (0.70, 0.15, 0.15)


def shipped_teacher_family() -> str:
    """The tabular teacher family that `osteoscreen train` chose (by cross-validation) for the shipped bundle."""
    from engines.bundle import bundled_models_dir

    card = json.loads((bundled_models_dir() / "fused_kdamm_v1" / "card.json").read_text())
    return str(card["metrics"]["teachers"]["tabular"]["choice"])


@dataclass
class SplitsConfig:
    splits: int = 20
    first_seed: int = 1000  # the shipped bundle's own split uses another seed (TrainConfig.seed)
    teacher: str = field(default_factory=shipped_teacher_family)  # every candidate family is reported too
    students: int = 0  # on the first this many splits, also train the KD student and compare it with the teacher
    limit: int | None = None  # a small slice of the cohort (tests)
    teacher_epochs: int | None = None  # None: TrainConfig's
    student_epochs: int | None = None


@dataclass(frozen=True)
class PairedSummary:
    """Per-split differences of two scores' AUCs (a minus b) on the same held-out rows."""

    mean: float
    sd: float
    ci: tuple[float, float]
    wins: int
    splits: int

    @classmethod
    def of(cls, diffs: list[float], test_over_train: float) -> "PairedSummary":
        d = np.asarray(diffs, dtype=float)
        k = d.size
        if k < 2:
            raise ValueError("a paired summary needs at least 2 splits")
        sd = float(d.std(ddof=1))
        half = float(student_t.ppf(0.975, k - 1)) * np.sqrt((1.0 / k + test_over_train) * sd * sd)
        mean = float(d.mean())
        return cls(mean, sd, (mean - half, mean + half), int((d > 0).sum()), k)

    @classmethod
    def from_dict(cls, d: dict) -> "PairedSummary":
        """From the report's JSON (``__dict__`` of one, with its interval as a list)."""
        return cls(float(d["mean"]), float(d["sd"]), (float(d["ci"][0]), float(d["ci"][1])), int(d["wins"]),
                   int(d["splits"]))

    def text(self) -> str:
        return (f"{self.mean:+.4f} (corrected 95% CI {self.ci[0]:+.4f} to {self.ci[1]:+.4f}; higher in "
                f"{self.wins} of {self.splits} splits)")


def run(cfg: SplitsConfig, report_dir: Path | None, log=print) -> dict:
    t0 = time.monotonic()
    tcfg = TrainConfig(limit=cfg.limit)
    if not cfg.students:
        tcfg.image_fraction = 0.0  # tabular only: no CT patches are generated (the tabular rows are the same)
    if cfg.teacher_epochs is not None:
        tcfg.teacher_epochs = cfg.teacher_epochs
    if cfg.student_epochs is not None:
        tcfg.student_epochs = cfg.student_epochs
    if cfg.teacher not in TEACHER_CANDIDATES:
        raise ValueError(f"unknown teacher family {cfg.teacher!r}; one of {', '.join(TEACHER_CANDIDATES)}")
    _seed_all(tcfg.seed, tcfg.threads)
    kernels = apply_runtime_pins(log, "osteoscreen train splits")
    d = prepare(tcfg, log)
    shipped_split = split_participants(d.frame, tcfg.seed, SPLIT_FRACTIONS)
    shipped_test_positives = int(d.y[shipped_split == "test"].sum())
    per_split = []
    for k in tqdm(range(cfg.splits), desc="splits", leave=False):
        seed = cfg.first_seed + k
        d.split = split_participants(d.frame, seed, SPLIT_FRACTIONS)
        tr, va, te = (np.nonzero(d.split == s)[0] for s in ("train", "val", "test"))
        d.mean = np.nanmean(d.x_raw[tr], axis=0)
        d.std = np.nanstd(d.x_raw[tr], axis=0) + 1e-6
        members = fit_teacher_members(d, tr, va, tcfg, seed)
        rows, _, mask = subset_rows_and_mask(d, te, "tabular")
        y = d.y[rows]
        auc = {c: M.auc(y, members.logits(c, d, rows, mask)) for c in TEACHER_CANDIDATES}
        auc["logreg"] = M.auc(y, logreg_score(members.logreg, d.scaled(d.m_real)[rows], d.m_real[rows]))
        ost = ost_score(d.x_raw[rows])
        ok = ~np.isnan(ost)  # OST needs weight: compared on the rows that have it
        teacher_ost_rows = M.auc(y[ok], members.logits(cfg.teacher, d, rows[ok], mask))
        per_split.append({"seed": seed, "n": int(len(y)), "positives": int(y.sum()), "auc": auc,
                          "ost": {"n": int(ok.sum()), "auc_ost": M.auc(y[ok], ost[ok]),
                                  "auc_teacher": teacher_ost_rows}})
        if k < cfg.students:
            student = _kd_student(d, tr, va, tcfg, cfg.teacher, seed)
            per_split[-1]["auc"]["student"] = M.auc(y, student_logits(student, d, rows, False, mask))
    ratio = SPLIT_FRACTIONS[2] / SPLIT_FRACTIONS[0]
    vs_logreg = {c: PairedSummary.of([s["auc"][c] - s["auc"]["logreg"] for s in per_split], ratio)
                 for c in TEACHER_CANDIDATES}
    with_student = [s for s in per_split if "student" in s["auc"]]
    vs_teacher = (PairedSummary.of([s["auc"]["student"] - s["auc"][cfg.teacher] for s in with_student], ratio)
                  if len(with_student) >= 2 else None)
    vs_ost = PairedSummary.of([s["ost"]["auc_teacher"] - s["ost"]["auc_ost"] for s in per_split], ratio)
    summary = {"config": cfg.__dict__ | {"split_fractions": SPLIT_FRACTIONS}, "teacher": cfg.teacher,
               "splits": per_split, "minus_logreg": {c: s.__dict__ for c, s in vs_logreg.items()},
               "teacher_minus_ost": vs_ost.__dict__,
               "student_minus_teacher": vs_teacher.__dict__ if vs_teacher else None,
               "seconds": round(time.monotonic() - t0, 1),
               "kernels": kernels, "cohort": {"n": int(len(d.y)), "positives": int(d.y.sum()),
                                             "label": LABEL_RULE},
               "shipped_test_positives": shipped_test_positives}
    line = (f"train splits: n={cfg.splits} teacher_minus_logreg={vs_logreg[cfg.teacher].mean:+.4f} "
            f"ci={vs_logreg[cfg.teacher].ci[0]:+.4f}..{vs_logreg[cfg.teacher].ci[1]:+.4f} "
            f"wins={vs_logreg[cfg.teacher].wins} teacher_minus_ost={vs_ost.mean:+.4f} "
            f"ci={vs_ost.ci[0]:+.4f}..{vs_ost.ci[1]:+.4f} wins={vs_ost.wins}")
    if vs_teacher is not None:
        line += (f" student_minus_teacher={vs_teacher.mean:+.4f} ci={vs_teacher.ci[0]:+.4f}..{vs_teacher.ci[1]:+.4f} "
                 f"wins={vs_teacher.wins}/{vs_teacher.splits}")
    summary["line"] = line
    if report_dir is not None:
        write_report(Path(report_dir), summary)
    return summary


def _kd_student(d: Data, tr: np.ndarray, va: np.ndarray, tcfg: TrainConfig, teacher: str, seed: int):
    """The fused student as `osteoscreen train` trains it on this split: out-of-fold tabular teacher targets on
    the hospital's modalities and on the complete rows, the image teacher, KD with the training configuration. The teacher family is the
    shipped one rather than chosen again by cross-validation on each split."""
    oof, oof_complete = np.full(len(d.y), np.nan), np.full(len(d.y), np.nan)
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    for j, (a, b) in enumerate(folds.split(tr, d.y[tr])):
        members = fit_teacher_members(d, tr[a], va, tcfg, seed + 7 * j)
        oof[tr[b]] = members.logits(teacher, d, tr[b], d.m_hosp)
        oof_complete[tr[b]] = members.logits(teacher, d, tr[b], d.m_real)
    oof[tr[~d.m_hosp[tr].any(axis=1)]] = np.nan
    tr_img = tr[d.has_image[tr]]
    image_teacher = train_image_teacher(d.images[tr_img], d.y[tr_img], tcfg, seed)
    t_img = np.full(len(d.y), np.nan)
    t_img[tr_img] = _image_logits(image_teacher, d.images[tr_img])
    return train_student(d, tr, oof[tr], t_img[tr], tcfg, tcfg.kd_alpha, seed, "student (KD)", oof_complete[tr])


def write_report(report_dir: Path, summary: dict) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "repeated_splits.md").write_text(report_markdown(summary))
    (report_dir / "repeated_splits.json").write_text(json.dumps(summary, indent=1, default=float))


def report_markdown(summary: dict) -> str:
    """docs/training/repeated_splits.md from a run's summary (its repeated_splits.json)."""
    cfg, splits = summary["config"], summary["splits"]
    teacher = summary["teacher"]
    vs_logreg = {c: PairedSummary.from_dict(v) for c, v in summary["minus_logreg"].items()}
    vs_ost = PairedSummary.from_dict(summary["teacher_minus_ost"])
    vs_teacher = PairedSummary.from_dict(summary["student_minus_teacher"]) if summary["student_minus_teacher"] else None
    lines = [
        "# Tabular teacher against its baselines over repeated participant splits",
        "",
        f"Generated by `osteoscreen train splits` in {summary['seconds']:.0f} s on this machine's CPU. "
        "RESEARCH USE ONLY. **Real data**: the NHANES tabular cohort of the training report "
        f"({summary['cohort']['n']} adults, {summary['cohort']['positives']} with femoral-neck T-score <= -2.5); "
        "every comparison below is on its real tabular rows. "
        + ("**Semi-synthetic data**: the CT patches the student also learns from in training."
           if summary["student_minus_teacher"] else "No image is used."),
        "",
        kernels_line(summary["kernels"]),
        "",
        *([] if summary["cohort"].get("label") == LABEL_RULE else [
            "**Stale**: this run predates the label fix of 2026-12-07 (13 participants with a femoral-neck T-score "
            "of exactly -2.5, then labelled negative by a floating-point rounding, are osteoporosis now; the "
            "stratified split changed with them). Its figures describe the earlier labelling and split; `osteoscreen "
            "train splits` (about 40-50 min) brings it up to date.", ""]),
        f"Why: the held-out split of `osteoscreen train` ([README.md](README.md)) has "
        f"{summary['shipped_test_positives']} positives, too few to tell "
        "AUC differences of a few thousandths apart. Here the teacher candidates "
        "(`fit_teacher_members`, same hyperparameters), the logistic regression and OST are refitted on "
        f"{cfg['splits']} further participant splits (seeds {cfg['first_seed']}-{cfg['first_seed'] + cfg['splits'] - 1}"
        ", stratified 70/15/15 as in training) and compared on each split's held-out part, demographics + labs, "
        "no image. The splits share participants, so the interval is the corrected resampled t (Nadeau and "
        "Bengio 2003), not the spread of the differences alone. The shipped bundle is not changed.",
        "",
        f"Shipped teacher family: {TEACHER_TEXT[teacher].format(n=TrainConfig().teacher_ensemble)} (`{teacher}`).",
        "",
        "| held-out AUC difference | mean over splits (corrected 95% CI; splits where higher) |",
        "|---|---|",
    ]
    for c, s in vs_logreg.items():
        lines.append(f"| {c} minus logistic regression | {s.text()} |")
    lines.append(f"| {teacher} minus OST (rows with weight) | {vs_ost.text()} |")
    if vs_teacher is not None:
        lines.append(f"| fused student (demographics + labs path) minus {teacher} teacher, first "
                     f"{vs_teacher.splits} splits | {vs_teacher.text()} |")
        lines += ["", f"The student on the first {vs_teacher.splits} splits is trained as `osteoscreen train` trains "
                  "it (out-of-fold teacher targets, image teacher, KD, modality dropout, draws with the hospital's "
                  "simulated missing modalities and draws with the complete rows: the training report's \"Student "
                  "training\") with the shipped teacher family; its semi-synthetic CT patches are those of "
                  "the shipped run. It is compared on the same held-out rows, with every tabular input and no image."]
    lines += ["", "Per split (held-out AUC):", "",
              "| seed | n | positives | " + " | ".join(TEACHER_CANDIDATES) + " | logistic | OST | student |",
              "|---:|---:|---:|" + "---:|" * (len(TEACHER_CANDIDATES) + 3)]
    for s in splits:
        student = f"{s['auc']['student']:.4f}" if "student" in s["auc"] else "-"
        lines.append(f"| {s['seed']} | {s['n']} | {s['positives']} | "
                     + " | ".join(f"{s['auc'][c]:.4f}" for c in TEACHER_CANDIDATES)
                     + f" | {s['auc']['logreg']:.4f} | {s['ost']['auc_ost']:.4f} | {student} |")
    lines += ["", "```", summary["line"], "```", ""]
    return "\n".join(lines)
