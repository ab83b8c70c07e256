"""`osteoscreen train`: rebuild the fused screening bundle from the shipped data, seeded.

Real data: the NHANES tabular cohort (demographics, labs, femoral-neck DXA label).
Semi-synthetic data: the CT image modality (see synth_ct). Modality availability
is simulated as in a hospital (some subjects image+labs, some image only, some labs
only). Every figure in the card and the report is measured in this run.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from torch import nn
from tqdm.auto import tqdm

from pipeline.features import DEMOGRAPHIC_IDX, FEATURE_NAMES, FEATURES, LAB_IDX
from pipeline.training import metrics as M
from pipeline.training.kernels import apply_runtime_pins
from pipeline.training.models import EMBED, ImageTeacher, Student, TabularTeacher
from pipeline.training.nhanes import load_cohort, reference_check, shipped_nhanes_dir, split_participants
from pipeline.training.synth_ct import SyntheticL1

BODY_SIZE_IDX = tuple(FEATURE_NAMES.index(n) for n in ("height", "weight", "bmi"))
SUBSETS = ("all", "image_only", "image_demographics", "tabular", "labs_only", "demographics_only")
TABULAR_SUBSETS = ("tabular", "labs_only", "demographics_only")  # no image: student and tabular teacher compared
SUBSET_TEXT = {
    "all": "image + demographics + labs",
    "image_only": "image only",
    "image_demographics": "image + demographics",
    "tabular": "demographics + labs (no image)",
    "labs_only": "labs only",
    "demographics_only": "demographics only",
}


@dataclass
class TrainConfig:
    seed: int = 20261123
    data_dir: Path = field(default_factory=shipped_nhanes_dir)
    image_fraction: float = 0.6
    no_labs_fraction: float = 0.4
    no_body_size_fraction: float = 0.3
    teacher_epochs: int = 25
    teacher_ensemble: int = 5
    student_epochs: int = 30
    batch_size: int = 256
    lr: float = 2e-3
    kd_alpha: float = 0.5
    kd_temperature: float = 2.0
    pos_weight: float = 4.0
    dropout_image: float = 0.25
    dropout_labs: float = 0.25
    dropout_demographics: float = 0.1
    # Share of training draws in which the student sees a row with every tabular value NHANES measured (and the
    # teacher's output on exactly those inputs) instead of the simulated hospital missingness. The teacher
    # learns from complete rows; without such draws the student meets complete rows only where the simulated
    # missingness happens to leave them. 0.5 was chosen on the validation split, never the test split: student
    # demographics + labs AUC 0.8774 at 0 (the earlier bundle's setting), 0.8773 at 0.3, 0.8793 at 0.5, against
    # the teacher's 0.8779 (one seeded sweep, docs/training/README.md "Student training").
    complete_row_fraction: float = 0.5
    target_sensitivity: float = 0.85
    bootstrap: int = 1000
    limit: int | None = None  # train on a small slice (tests)
    threads: int = 2


def _seed_all(seed: int, threads: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=float)))


@dataclass
class Data:
    frame: pd.DataFrame
    split: np.ndarray
    x_raw: np.ndarray  # NaN where missing
    m_real: np.ndarray  # what NHANES measured
    m_hosp: np.ndarray  # what a hospital would have (simulated)
    has_image: np.ndarray
    images: np.ndarray  # (N,3,32,32), zeros without image
    roi_hu: np.ndarray  # generated L1 trabecular HU (NaN without image)
    y: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    l1_ref: dict

    def scaled(self, mask: np.ndarray) -> np.ndarray:
        x = (np.nan_to_num(self.x_raw, nan=0.0) - self.mean) / self.std
        return np.where(mask, x, 0.0).astype(np.float32)


def prepare(cfg: TrainConfig, log) -> Data:
    cohort = load_cohort(cfg.data_dir)
    df = cohort.frame
    if cfg.limit:
        rng = np.random.default_rng(cfg.seed)
        pos = np.nonzero(df["label"].to_numpy() == 1)[0]
        neg = np.nonzero(df["label"].to_numpy() == 0)[0]
        n_pos = max(20, int(round(cfg.limit * 0.1)))
        keep = np.concatenate([rng.permutation(pos)[:n_pos], rng.permutation(neg)[: cfg.limit - n_pos]])
        df = df.iloc[np.sort(keep)].reset_index(drop=True)
    split = split_participants(df, cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)
    x_raw = df[list(FEATURE_NAMES)].to_numpy(dtype=float)
    m_real = ~np.isnan(x_raw)
    m_hosp = m_real.copy()
    m_hosp[np.ix_(rng.random(len(df)) < cfg.no_labs_fraction, LAB_IDX)] = False
    m_hosp[np.ix_(rng.random(len(df)) < cfg.no_body_size_fraction, BODY_SIZE_IDX)] = False
    has_image = df["l1_bmd"].notna().to_numpy() & (rng.random(len(df)) < cfg.image_fraction)
    tr = split == "train"
    mean = np.nanmean(x_raw[tr], axis=0)
    std = np.nanstd(x_raw[tr], axis=0) + 1e-6
    # L1 DXA young-adult reference (sex-specific, ages 20-29, training split): T_L1 for the generator.
    l1_ref = {}
    t_l1 = np.full(len(df), np.nan)
    for female in (0.0, 1.0):
        sel = tr & (df["female"].to_numpy() == female) & (df["age"].to_numpy() < 30) & df["l1_bmd"].notna().to_numpy()
        mu, sd = float(df.loc[sel, "l1_bmd"].mean()), float(df.loc[sel, "l1_bmd"].std())
        if not np.isfinite(mu):  # tiny slices: fall back to all training adults of that sex
            sel = tr & (df["female"].to_numpy() == female) & df["l1_bmd"].notna().to_numpy()
            mu, sd = float(df.loc[sel, "l1_bmd"].mean()), float(df.loc[sel, "l1_bmd"].std())
        l1_ref["female" if female else "male"] = {"mean": mu, "sd": sd, "n": int(sel.sum())}
        rows = df["female"].to_numpy() == female
        t_l1[rows] = (df.loc[rows, "l1_bmd"].to_numpy() - mu) / sd
    gen = SyntheticL1()
    idx = np.nonzero(has_image)[0]
    log(f"generating {idx.size} semi-synthetic L1 CT patches")
    target = gen.target_hu(t_l1[idx], np.random.default_rng(cfg.seed + 2))
    images = np.zeros((len(df), 3, 32, 32), dtype=np.float32)
    images[idx] = gen.patches(target, cfg.seed + 3)
    roi_hu = np.full(len(df), np.nan)
    roi_hu[idx] = images[idx, 1, 13:19, 13:19].mean(axis=(1, 2)) * 200.0 + 100.0  # central ROI, as measured
    data = Data(df, split, x_raw, m_real, m_hosp, has_image, images, roi_hu, df["label"].to_numpy(), mean, std,
                l1_ref)
    data.generator = gen.describe()  # type: ignore[attr-defined]
    data.target_hu = np.full(len(df), np.nan)  # type: ignore[attr-defined]  # per subject, for other generators
    data.target_hu[idx] = target  # type: ignore[attr-defined]
    data.reference = reference_check(cohort)  # type: ignore[attr-defined]
    data.excluded = cohort.excluded  # type: ignore[attr-defined]
    return data


def _batches(n: int, bs: int, rng: np.random.Generator):
    order = rng.permutation(n)
    for i in range(0, n, bs):
        yield order[i : i + bs]


def _bce(pos_weight: float):
    return nn.BCEWithLogitsLoss(pos_weight=torch.tensor([pos_weight]))


def train_tabular_mlp_es(x, m, y, x_val, m_val, y_val, cfg: TrainConfig, seed: int,
                         max_epochs: int) -> tuple[TabularTeacher, int]:
    """Masked MLP, stopped at the epoch with the best validation AUC."""
    torch.manual_seed(seed)
    net = TabularTeacher(x.shape[1])
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    loss_fn = _bce(cfg.pos_weight)
    rng = np.random.default_rng(seed)
    xt, mt, yt = torch.from_numpy(x), torch.from_numpy(m.astype(np.float32)), torch.from_numpy(y.astype(np.float32))
    best_auc, best_state, best_epoch = -1.0, None, 0
    for epoch in range(max_epochs):
        net.train()
        for b in _batches(len(y), cfg.batch_size, rng):
            opt.zero_grad()
            loss_fn(net(xt[b], mt[b]).squeeze(1), yt[b]).backward()
            opt.step()
        net.eval()
        a = M.auc(y_val, _mlp_logits(net, x_val, m_val))
        if a > best_auc:
            best_auc, best_epoch = a, epoch + 1
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    return net.eval(), best_epoch


class MLPEnsemble:
    """Mean logit of several early-stopped masked MLPs (different seeds)."""

    def __init__(self, nets: list[TabularTeacher]) -> None:
        self.nets = nets

    def logits(self, x, m) -> np.ndarray:
        return np.mean([_mlp_logits(n, x, m) for n in self.nets], axis=0)


def train_mlp_ensemble(x, m, y, x_val, m_val, y_val, cfg: TrainConfig, seed: int) -> tuple[MLPEnsemble, list[int]]:
    nets, epochs = [], []
    for k in range(cfg.teacher_ensemble):
        net, ep = train_tabular_mlp_es(x, m, y, x_val, m_val, y_val, cfg, seed + 101 * k, cfg.teacher_epochs)
        nets.append(net)
        epochs.append(ep)
    return MLPEnsemble(nets), epochs


def _mlp_logits(net, x, m) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(x), torch.from_numpy(m.astype(np.float32))).squeeze(1).numpy().astype(float)


def _gbt(seed: int) -> HistGradientBoostingClassifier:
    # early stopping set explicitly: sklearn's "auto" turns it on only above 10,000 rows, so the cross-validation
    # folds (~9,200 rows) ran 300 iterations while the final fit (~11,500) stopped early, a different model
    return HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, max_leaf_nodes=15, min_samples_leaf=40,
                                          l2_regularization=1.0, random_state=seed, early_stopping=True)


def _gbt_logit(model, x_raw, mask) -> np.ndarray:
    p = model.predict_proba(np.where(mask, x_raw, np.nan))[:, 1]
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


TEACHER_CANDIDATES = ("trees", "mlp", "mlp+linear")
TEACHER_TEXT = {
    "trees": "gradient-boosted trees",
    "mlp": "masked MLP ensemble ({n} seeds, early stopping)",
    "mlp+linear": "masked MLP ensemble ({n} seeds, early stopping) averaged with a logistic model",
}


@dataclass
class TeacherMembers:
    """The tabular teacher candidates fitted on one set of rows.

    ``mlp+linear`` averages the MLP ensemble's log-odds with the logistic model's; the logistic
    log-odds are shifted by log(pos_weight) onto the MLP's class-weighted scale first, so the
    average is a logit the student can be distilled towards.
    """

    gbt: HistGradientBoostingClassifier
    mlp: MLPEnsemble
    mlp_epochs: list[int]
    logreg: dict
    pos_weight: float

    def logits(self, candidate: str, d: Data, rows: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if candidate == "trees":
            return _gbt_logit(self.gbt, d.x_raw[rows], mask[rows])
        mlp = self.mlp.logits(d.scaled(mask)[rows], mask[rows])
        if candidate == "mlp":
            return mlp
        linear = logreg_score(self.logreg, d.scaled(mask)[rows], mask[rows]) + np.log(self.pos_weight)
        return 0.5 * (mlp + linear)


def fit_teacher_members(d: Data, rows: np.ndarray, val: np.ndarray, cfg: TrainConfig, seed: int) -> TeacherMembers:
    """Fit every tabular teacher candidate on ``rows`` (the MLPs stop early on ``val``), on real availability."""
    xs = d.scaled(d.m_real)
    gbt = _gbt(seed).fit(np.where(d.m_real, d.x_raw, np.nan)[rows], d.y[rows])
    mlp, epochs = train_mlp_ensemble(xs[rows], d.m_real[rows], d.y[rows], xs[val], d.m_real[val], d.y[val], cfg, seed)
    return TeacherMembers(gbt, mlp, epochs, fit_logreg(d, rows, cfg.seed), cfg.pos_weight)


def train_image_teacher(images, y, cfg: TrainConfig, seed: int) -> ImageTeacher:
    torch.manual_seed(seed)
    net = ImageTeacher()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    loss_fn = _bce(cfg.pos_weight)
    rng = np.random.default_rng(seed)
    xi, yt = torch.from_numpy(images), torch.from_numpy(y.astype(np.float32))
    for _ in tqdm(range(cfg.teacher_epochs), desc="image teacher", leave=False):
        net.train()
        for b in _batches(len(y), cfg.batch_size, rng):
            opt.zero_grad()
            loss_fn(net(xi[b]).squeeze(1), yt[b]).backward()
            opt.step()
    return net.eval()


def _image_logits(net, images) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([net(torch.from_numpy(images[i : i + 1024])).squeeze(1).numpy()
                               for i in range(0, len(images), 1024)]).astype(float) if len(images) else np.zeros(0)


def train_student(d: Data, idx: np.ndarray, teacher_tab: np.ndarray, teacher_img: np.ndarray, cfg: TrainConfig,
                  alpha: float, seed: int, desc: str, teacher_tab_complete: np.ndarray | None = None) -> Student:
    """KD student. ``teacher_*`` are logits per row of ``idx`` (NaN where that teacher did not see the sample):
    ``teacher_tab`` on the simulated hospital inputs (``m_hosp``), ``teacher_tab_complete`` on every value NHANES
    measured (``m_real``), used in the ``cfg.complete_row_fraction`` draws that show the student complete rows."""
    complete_share = cfg.complete_row_fraction
    if complete_share > 0 and teacher_tab_complete is None:
        raise ValueError("complete_row_fraction > 0 needs the teacher's logits on the complete rows")
    torch.manual_seed(seed)
    net = Student(len(FEATURES))
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    loss_fn = _bce(cfg.pos_weight)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(d.scaled(d.m_hosp)[idx])
    m0 = d.m_hosp[idx]
    img = torch.from_numpy(d.images[idx])
    has_img0 = d.has_image[idx]
    y = torch.from_numpy(d.y[idx].astype(np.float32))
    t_tab = torch.from_numpy(np.nan_to_num(teacher_tab, nan=0.0).astype(np.float32))
    if complete_share > 0:
        x_complete = torch.from_numpy(d.scaled(d.m_real)[idx])
        m_complete = d.m_real[idx]
        t_complete = torch.from_numpy(np.nan_to_num(teacher_tab_complete, nan=0.0).astype(np.float32))
        w_complete = torch.from_numpy((~np.isnan(teacher_tab_complete)).astype(np.float32))
    t_img = torch.from_numpy(np.nan_to_num(teacher_img, nan=0.0).astype(np.float32))
    w_tab = torch.from_numpy((~np.isnan(teacher_tab)).astype(np.float32))
    w_img = torch.from_numpy((~np.isnan(teacher_img)).astype(np.float32))
    T = cfg.kd_temperature
    demo, labs = np.array(DEMOGRAPHIC_IDX), np.array(LAB_IDX)
    for _ in tqdm(range(cfg.student_epochs), desc=desc, leave=False):
        net.train()
        for b in _batches(len(idx), cfg.batch_size, rng):
            m = m0[b].copy()
            has_img = has_img0[b].copy()
            xb, tb, wb = x[b], t_tab[b], w_tab[b]
            if complete_share > 0:  # these draws see the row as NHANES measured it
                full = rng.random(len(b)) < complete_share
                m[full] = m_complete[b][full]
                sel = torch.from_numpy(full)
                xb = torch.where(sel[:, None], x_complete[b], xb)
                tb = torch.where(sel, t_complete[b], tb)
                wb = torch.where(sel, w_complete[b], wb)
            # modality dropout, keeping at least one modality per sample
            drop_img = has_img & (rng.random(len(b)) < cfg.dropout_image)
            drop_lab = rng.random(len(b)) < cfg.dropout_labs
            drop_demo = rng.random(len(b)) < cfg.dropout_demographics
            for j in range(len(b)):
                after_img = has_img[j] and not drop_img[j]
                after_lab = m[j, labs].any() and not drop_lab[j]
                after_demo = m[j, demo].any() and not drop_demo[j]
                if not (after_img or after_lab or after_demo):
                    continue
                has_img[j] = after_img
                if drop_lab[j]:
                    m[j, labs] = False
                if drop_demo[j]:
                    m[j, demo] = False
            mt = torch.from_numpy(m.astype(np.float32))
            # Only rows that keep their image go through the encoder: an absent image's fusion weight is
            # exactly 0 (its score is pushed down by 1e4 before the softmax), so its embedding is never used.
            keep = torch.from_numpy(has_img)
            embedding = torch.zeros(len(b), EMBED)
            if has_img.any():
                embedding[keep] = net.image_encoder(img[b][keep])
            logit = net.head(embedding, keep.float()[:, None], xb * mt, mt).squeeze(1)
            loss = loss_fn(logit, y[b])
            if alpha > 0:
                soft = torch.sigmoid(logit / T)
                kd = 0.0
                for t, w in ((tb, wb), (t_img[b], w_img[b])):
                    target = torch.sigmoid(t / T)
                    kd_i = nn.functional.binary_cross_entropy(soft, target, reduction="none") * w
                    kd = kd + kd_i.sum() / w.sum().clamp(min=1.0)
                loss = (1 - alpha) * loss + alpha * (T * T) * kd
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def student_logits(net: Student, d: Data, idx: np.ndarray, use_image: bool, mask: np.ndarray) -> np.ndarray:
    x = d.scaled(mask)[idx]
    with torch.no_grad():
        out = []
        for i in range(0, len(idx), 1024):
            sl = idx[i : i + 1024]
            img_present = (d.has_image[sl] & use_image).astype(np.float32)[:, None]
            out.append(net(torch.from_numpy(d.images[sl]), torch.from_numpy(img_present),
                           torch.from_numpy(x[i : i + 1024]), torch.from_numpy(mask[sl].astype(np.float32))).squeeze(1))
        return torch.cat(out).numpy().astype(float) if out else np.zeros(0)


def subset_rows_and_mask(d: Data, rows: np.ndarray, subset: str) -> tuple[np.ndarray, bool, np.ndarray]:
    """Rows that have the subset's modalities, whether the image is used, and the tabular mask."""
    m = np.zeros_like(d.m_real)
    labs_any = d.m_real[:, LAB_IDX].any(axis=1)
    if subset == "all":
        sel = rows[d.has_image[rows] & labs_any[rows]]
        m[:] = d.m_real
        return sel, True, m
    if subset == "image_only":
        return rows[d.has_image[rows]], True, m
    if subset == "image_demographics":
        m[:, DEMOGRAPHIC_IDX] = d.m_real[:, DEMOGRAPHIC_IDX]
        return rows[d.has_image[rows]], True, m
    if subset == "tabular":  # rows with at least one lab (without one the service uses demographics only)
        m[:] = d.m_real
        return rows[labs_any[rows]], False, m
    if subset == "labs_only":
        m[:, LAB_IDX] = d.m_real[:, LAB_IDX]
        return rows[labs_any[rows]], False, m
    if subset == "demographics_only":
        m[:, DEMOGRAPHIC_IDX] = d.m_real[:, DEMOGRAPHIC_IDX]
        return rows, False, m
    raise ValueError(subset)


def fit_logreg(d: Data, rows: np.ndarray, seed: int) -> dict:
    """Logistic regression baseline: standardized features, mean-imputed, plus missing indicators."""
    x = np.concatenate([d.scaled(d.m_real)[rows], (~d.m_real[rows]).astype(np.float32)], axis=1)
    lr = LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit(x, d.y[rows])
    return {"coef": lr.coef_[0].tolist(), "intercept": float(lr.intercept_[0])}


def logreg_score(model: dict, x_scaled: np.ndarray, mask: np.ndarray) -> np.ndarray:
    x = np.concatenate([x_scaled, (~mask).astype(np.float32)], axis=1)
    return x @ np.asarray(model["coef"]) + model["intercept"]


def ost_score(x_raw: np.ndarray) -> np.ndarray:
    """Osteoporosis Self-assessment Tool: 0.2 x (weight kg - age y); lower means higher risk, so negate."""
    age = x_raw[:, FEATURE_NAMES.index("age")]
    weight = x_raw[:, FEATURE_NAMES.index("weight")]
    return -0.2 * (weight - age)


def _platt(logit: np.ndarray, y: np.ndarray, seed: int) -> tuple[float, float]:
    lr = LogisticRegression(C=1e4, max_iter=1000, random_state=seed).fit(logit[:, None], y)
    return float(lr.coef_[0, 0]), float(lr.intercept_[0])


def run(cfg: TrainConfig, bundle_dir: Path, report_dir: Path | None, log=print) -> dict:
    t0 = time.monotonic()
    _seed_all(cfg.seed, cfg.threads)
    kernels = apply_runtime_pins(log, "osteoscreen train")
    d = prepare(cfg, log)
    tr, va, te = (np.nonzero(d.split == s)[0] for s in ("train", "val", "test"))
    log(f"cohort: {len(d.y)} adults, prevalence {d.y.mean():.4f}; split train/val/test "
        f"{tr.size}/{va.size}/{te.size} (positives {d.y[tr].sum()}/{d.y[va].sum()}/{d.y[te].sum()})")

    # --- tabular teacher: candidates compared by 5-fold cross-validated AUC on the training split ---
    # (the validation split has under 80 positives: too few to choose a model family on its own)
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=cfg.seed)
    oof_real = {c: np.full(len(d.y), np.nan) for c in TEACHER_CANDIDATES}
    oof_hosp = {c: np.full(len(d.y), np.nan) for c in TEACHER_CANDIDATES}
    for k, (a, b) in enumerate(tqdm(list(folds.split(tr, d.y[tr])), desc="teacher CV", leave=False)):
        ra, rb = tr[a], tr[b]
        members = fit_teacher_members(d, ra, va, cfg, cfg.seed + 7 * k)
        for c in TEACHER_CANDIDATES:
            oof_real[c][rb] = members.logits(c, d, rb, d.m_real)
            oof_hosp[c][rb] = members.logits(c, d, rb, d.m_hosp)
    cv_auc = {c: M.auc(d.y[tr], oof_real[c][tr]) for c in TEACHER_CANDIDATES}
    choice = max(TEACHER_CANDIDATES, key=lambda c: cv_auc[c])
    teacher = fit_teacher_members(d, tr, va, cfg, cfg.seed)
    val_auc = {c: M.auc(d.y[va], teacher.logits(c, d, va, d.m_real)) for c in TEACHER_CANDIDATES}
    teacher_kind = TEACHER_TEXT[choice].format(n=cfg.teacher_ensemble)
    log("tabular teacher: cross-validated AUC " + ", ".join(f"{c} {cv_auc[c]:.3f}" for c in TEACHER_CANDIDATES)
        + f" -> {teacher_kind}")

    def teacher_tab_logit(rows, mask):
        return teacher.logits(choice, d, rows, mask)

    # Out-of-fold teacher signal for the training rows (a teacher's in-sample output is overconfident),
    # on the modalities a hospital would have.
    oof = oof_hosp[choice]
    oof[tr[~d.m_hosp[tr].any(axis=1)]] = np.nan

    # --- image teacher (semi-synthetic) ---
    tr_img = tr[d.has_image[tr]]
    img_teacher = train_image_teacher(d.images[tr_img], d.y[tr_img], cfg, cfg.seed)
    t_img = np.full(len(d.y), np.nan)
    t_img[tr_img] = _image_logits(img_teacher, d.images[tr_img])
    va_img = va[d.has_image[va]]
    log(f"image teacher: validation AUC {M.auc(d.y[va_img], _image_logits(img_teacher, d.images[va_img])):.3f} "
        f"(semi-synthetic images)")

    # --- students: with and without KD, same seed ---
    oof_complete = oof_real[choice]
    student = train_student(d, tr, oof[tr], t_img[tr], cfg, cfg.kd_alpha, cfg.seed, "student (KD)",
                            oof_complete[tr])
    student_nokd = train_student(d, tr, oof[tr], t_img[tr], cfg, 0.0, cfg.seed, "student (no KD)", oof_complete[tr])

    # --- calibration (Platt) and operating points on validation ---
    val_logit = student_logits(student, d, va, True, d.m_hosp)
    platt = _platt(val_logit, d.y[va], cfg.seed)

    def prob(logit):
        return _sigmoid(platt[0] * np.asarray(logit) + platt[1])

    thresholds, validation_auc = {}, {}
    for s in SUBSETS:
        rows, use_img, mask = subset_rows_and_mask(d, va, s)
        p_val = prob(student_logits(student, d, rows, use_img, mask))
        thresholds[s] = M.threshold_for_sensitivity(d.y[rows], p_val, cfg.target_sensitivity)
        validation_auc[s] = M.auc(d.y[rows], p_val)  # what other models are compared with (never the test split)

    # --- held-out evaluation ---
    results: dict = {"subsets": {}, "ablation_kd": {}, "baselines": {}, "teachers": {}}
    for s in SUBSETS:
        rows, use_img, mask = subset_rows_and_mask(d, te, s)
        y = d.y[rows]
        p = prob(student_logits(student, d, rows, use_img, mask))
        a, lo, hi = M.bootstrap_auc(y, p, n=cfg.bootstrap, seed=cfg.seed)
        op = M.at_threshold(y, p, thresholds[s])
        op_ci = M.bootstrap_at_threshold(y, p, thresholds[s], n=cfg.bootstrap, seed=cfg.seed)
        results["subsets"][s] = {"n": int(len(y)), "positives": int(y.sum()), "auc": a, "auc_ci": [lo, hi],
                                 "brier": M.brier(y, p), "ece": M.ece(y, p), "threshold": thresholds[s], **op,
                                 **op_ci, "validation_auc": validation_auc[s]}
        p0 = student_logits(student_nokd, d, rows, use_img, mask)
        results["ablation_kd"][s] = {"auc_kd": a, "auc_no_kd": M.auc(y, p0)}
        results.setdefault("_curves", {})[s] = (y, p)
    # teacher, baselines and student compared on every test row with its tabular data as NHANES measured it
    rows_tab, mask_tab = te, d.m_real
    y_tab = d.y[rows_tab]
    teacher_te = teacher_tab_logit(rows_tab, mask_tab)
    logreg = teacher.logreg  # the baseline is the teacher's linear member on its own
    lr_te = logreg_score(logreg, d.scaled(d.m_real)[rows_tab], d.m_real[rows_tab])
    ost_te = ost_score(d.x_raw[rows_tab])
    ost_ok = ~np.isnan(ost_te)
    student_tab = prob(student_logits(student, d, rows_tab, False, mask_tab))
    results["teachers"]["tabular"] = {"kind": teacher_kind, "choice": choice, "cv_auc": cv_auc, "val_auc": val_auc,
                                      "mlp_epochs": teacher.mlp_epochs,
                                      "auc": list(M.bootstrap_auc(y_tab, teacher_te, n=cfg.bootstrap, seed=cfg.seed))}
    rows_img = te[d.has_image[te]]
    results["teachers"]["image"] = {"auc": list(M.bootstrap_auc(d.y[rows_img],
                                                                _image_logits(img_teacher, d.images[rows_img]),
                                                                n=cfg.bootstrap, seed=cfg.seed))}
    results["baselines"]["ost"] = {"auc": list(M.bootstrap_auc(y_tab[ost_ok], ost_te[ost_ok], n=cfg.bootstrap,
                                                               seed=cfg.seed)), "n": int(ost_ok.sum())}
    results["baselines"]["logreg"] = {"auc": list(M.bootstrap_auc(y_tab, lr_te, n=cfg.bootstrap, seed=cfg.seed))}
    pick = d.roi_hu[rows_img]
    results["baselines"]["pickhardt_l1_hu"] = {
        "auc": list(M.bootstrap_auc(d.y[rows_img], -pick, n=cfg.bootstrap, seed=cfg.seed)),
        "at_110_hu": M.at_threshold(d.y[rows_img], (pick <= 110).astype(float), 0.5),
        "note": "on semi-synthetic images",
    }
    results["comparisons"] = {
        "teacher_minus_ost": list(M.bootstrap_auc_difference(y_tab[ost_ok], teacher_te[ost_ok], ost_te[ost_ok],
                                                             n=cfg.bootstrap, seed=cfg.seed)),
        "teacher_minus_logreg": list(M.bootstrap_auc_difference(y_tab, teacher_te, lr_te, n=cfg.bootstrap,
                                                                seed=cfg.seed)),
        "student_tabular_minus_teacher": list(M.bootstrap_auc_difference(y_tab, student_tab, teacher_te,
                                                                         n=cfg.bootstrap, seed=cfg.seed)),
    }
    # Student against the tabular teacher on the same (possibly incomplete) tabular inputs. The teacher saw
    # every training row's real tabular data, so KD cannot give the student more of it; what the student
    # gains is robustness when a modality is missing.
    results["comparisons"]["student_minus_teacher_by_subset"] = {}
    for s in TABULAR_SUBSETS:
        rows, _, mask = subset_rows_and_mask(d, te, s)
        y_s = d.y[rows]
        student_s = results["_curves"][s][1]
        teacher_s = teacher_tab_logit(rows, mask)
        results["comparisons"]["student_minus_teacher_by_subset"][s] = {
            "auc_student": M.auc(y_s, student_s), "auc_teacher": M.auc(y_s, teacher_s),
            "difference": list(M.bootstrap_auc_difference(y_s, student_s, teacher_s, n=cfg.bootstrap,
                                                          seed=cfg.seed))}
    # how much do labs add over demographics (teacher family, same split)
    demo_cols = list(DEMOGRAPHIC_IDX)
    gbt_demo = _gbt(cfg.seed).fit(d.x_raw[tr][:, demo_cols], d.y[tr])
    demo_te = _gbt_logit(gbt_demo, d.x_raw[rows_tab][:, demo_cols], d.m_real[rows_tab][:, demo_cols])
    results["comparisons"]["labs_added_trees"] = list(M.bootstrap_auc_difference(
        y_tab, _gbt_logit(teacher.gbt, d.x_raw[rows_tab], d.m_real[rows_tab]), demo_te, n=cfg.bootstrap, seed=cfg.seed))
    demo_lr = LogisticRegression(C=1.0, max_iter=2000, random_state=cfg.seed).fit(
        np.concatenate([d.scaled(d.m_real)[tr][:, demo_cols], (~d.m_real[tr][:, demo_cols]).astype(np.float32)], 1),
        d.y[tr])
    demo_lr_te = demo_lr.decision_function(np.concatenate(
        [d.scaled(d.m_real)[rows_tab][:, demo_cols], (~d.m_real[rows_tab][:, demo_cols]).astype(np.float32)], 1))
    results["comparisons"]["labs_added_logreg"] = list(M.bootstrap_auc_difference(
        y_tab, lr_te, demo_lr_te, n=cfg.bootstrap, seed=cfg.seed))
    # In service a CT header often lacks height and weight (30 % in the simulated availability); the subsets
    # above keep NHANES's measured body size. The student without it, at the operating points the service then
    # uses (demographics only / demographics + labs), on the same test rows.
    results["without_body_size"] = {}
    for s in ("demographics_only", "tabular"):
        rows, use_img, mask = subset_rows_and_mask(d, te, s)
        mask = mask.copy()
        mask[:, list(BODY_SIZE_IDX)] = False
        y = d.y[rows]
        p = prob(student_logits(student, d, rows, use_img, mask))
        a, lo, hi = M.bootstrap_auc(y, p, n=cfg.bootstrap, seed=cfg.seed)
        results["without_body_size"][s] = {"n": int(len(y)), "positives": int(y.sum()), "auc": a, "auc_ci": [lo, hi],
                                           "threshold": thresholds[s], **M.at_threshold(y, p, thresholds[s])}

    curves = results.pop("_curves")
    summary = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "cohort": {"n": int(len(d.y)), "prevalence": float(d.y.mean()), "excluded": d.excluded,  # type: ignore
                   "split": {s: {"n": int((d.split == s).sum()), "positives": int(d.y[d.split == s].sum())}
                             for s in ("train", "val", "test")},
                   "fn_reference_check": d.reference,  # type: ignore[attr-defined]
                   "l1_young_adult_reference": d.l1_ref,
                   "images": int(d.has_image.sum()),
                   "cycles": sorted(d.frame["cycle"].unique().tolist())},
        "generator": d.generator,  # type: ignore[attr-defined]
        "calibration": {"method": "Platt", "a": platt[0], "b": platt[1]},
        "thresholds": thresholds,
        "results": results,
        "seconds": round(time.monotonic() - t0, 1),
        "kernels": kernels,
    }
    from pipeline.training.export import write_bundle, write_report

    write_bundle(bundle_dir, student, d, summary, logreg)
    if report_dir is not None:
        write_report(report_dir, summary, curves)
    return summary
