"""NHANES cohort: adults with femoral-neck DXA, routine labs and demographics, real missingness.

Files are `<TABLE>_<SUFFIX>.csv.xz` (CDC XPT converted to CSV with the original
variable names). A missing table means that modality is missing for the cycle.
Label: WHO osteoporosis, femoral-neck T-score <= -2.5 against the NHANES III
young-adult reference (non-Hispanic white women aged 20-29: mean 0.858 g/cm2,
SD 0.120; Looker AC et al., Osteoporos Int 1998;8:468-489).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.features import FEATURES

FN_REF_MEAN = 0.858
FN_REF_SD = 0.120
T_SCORE_OSTEOPOROSIS = -2.5
LABEL_RULE = "fn_t rounded to 9 decimals <= -2.5"  # recorded with a run, so a report can tell the labelling it used
TABLES = ("DEMO", "BMX", "DXXFEM", "DXXSPN", "BIOPRO", "CBC", "VID")
_FILE = re.compile(r"^([A-Z0-9]+)_([A-Z0-9]+)\.csv(\.xz)?$")


def shipped_nhanes_dir() -> Path:
    return Path(__file__).resolve().parent / "data" / "nhanes"


def fn_t_score(bmd: np.ndarray | pd.Series) -> np.ndarray:
    return (np.asarray(bmd, dtype=float) - FN_REF_MEAN) / FN_REF_SD


def _tables(folder: Path) -> dict[str, dict[str, Path]]:
    """suffix -> table -> file."""
    out: dict[str, dict[str, Path]] = {}
    for f in sorted(folder.iterdir()):
        m = _FILE.match(f.name)
        if m and m.group(1) in TABLES:
            out.setdefault(m.group(2), {})[m.group(1)] = f
        elif m and m.group(2) in TABLES:  # the 2017-March 2020 pre-pandemic files: P_DEMO, P_BMX, ...
            out.setdefault(m.group(1), {})[m.group(2)] = f
    return out


def _cycle_frame(suffix: str, files: dict[str, Path]) -> pd.DataFrame | None:
    if "DEMO" not in files or "DXXFEM" not in files:
        return None  # no participants or no label in this cycle
    df = pd.read_csv(files["DEMO"], usecols=lambda c: c in ("SEQN", "RIDAGEYR", "RIAGENDR", "RIDRETH1"))
    for table in ("BMX", "DXXFEM", "DXXSPN", "BIOPRO", "CBC", "VID"):
        if table in files:
            df = df.merge(pd.read_csv(files[table]), on="SEQN", how="left")
    out = pd.DataFrame({"seqn": df["SEQN"].astype(int), "cycle": suffix})
    for feat in FEATURES:
        col = next((c for c in feat.nhanes if c in df.columns), None)
        out[feat.name] = df[col].astype(float) if col else np.nan
    out["female"] = (out["female"] == 2).astype(float).where(out["female"].notna())
    out["race"] = df.get("RIDRETH1", pd.Series(np.nan, index=df.index))
    status = df.get("DXAFMRST")
    fn = df.get("DXXNKBMD", pd.Series(np.nan, index=df.index)).astype(float)
    if status is not None:
        fn = fn.where(status.isna() | (status == 1))
    out["fn_bmd"] = fn
    out["l1_bmd"] = df["DXXL1BMD"].astype(float) if "DXXL1BMD" in df.columns else np.nan
    return out


@dataclass(frozen=True)
class Cohort:
    frame: pd.DataFrame  # one row per participant: features, fn_bmd, l1_bmd, label
    source: str
    excluded: dict[str, int]


def load_cohort(folder: str | Path, *, min_age: float = 20.0) -> Cohort:
    folder = Path(folder)
    frames = [f for s, files in _tables(folder).items() if (f := _cycle_frame(s, files)) is not None]
    if not frames:
        raise FileNotFoundError(f"no NHANES DEMO + DXXFEM tables in {folder}")
    df = pd.concat(frames, ignore_index=True)
    excluded = {
        "under_min_age": int((df["age"] < min_age).sum()),
        "no_valid_femoral_neck_dxa": int(((df["age"] >= min_age) & df["fn_bmd"].isna()).sum()),
    }
    df = df[(df["age"] >= min_age) & df["fn_bmd"].notna()].copy()
    df["fn_t"] = fn_t_score(df["fn_bmd"])
    # rounded before the comparison: BMD 0.558 gives (0.558 - 0.858) / 0.120 = -2.4999999999999996 in floating
    # point, and those participants (T = -2.5 exactly, osteoporosis by the WHO definition) were labelled negative
    df["label"] = (np.round(df["fn_t"], 9) <= T_SCORE_OSTEOPOROSIS).astype(int)
    df = df.reset_index(drop=True)
    return Cohort(df, str(folder), excluded)


def reference_check(cohort: Cohort) -> dict[str, float]:
    """Femoral-neck BMD of non-Hispanic white women aged 20-29 in this cohort vs the NHANES III reference."""
    d = cohort.frame
    ref = d[(d["female"] == 1) & (d["race"] == 3) & (d["age"] >= 20) & (d["age"] < 30)]["fn_bmd"]
    return {"n": int(ref.size), "mean": float(ref.mean()), "sd": float(ref.std()),
            "nhanes3_mean": FN_REF_MEAN, "nhanes3_sd": FN_REF_SD}


def split_participants(frame: pd.DataFrame, seed: int, fractions=(0.70, 0.15, 0.15)) -> np.ndarray:
    """'train' / 'val' / 'test' per row, by participant, stratified by label, fixed seed."""
    rng = np.random.default_rng(seed)
    split = np.empty(len(frame), dtype=object)
    for label in (0, 1):
        idx = np.nonzero(frame["label"].to_numpy() == label)[0]
        idx = idx[rng.permutation(idx.size)]
        n_tr = int(round(fractions[0] * idx.size))
        n_va = int(round(fractions[1] * idx.size))
        split[idx[:n_tr]] = "train"
        split[idx[n_tr : n_tr + n_va]] = "val"
        split[idx[n_tr + n_va :]] = "test"
    return split
