"""Volume, L1 localisation and trabecular ROI on the real sample CT (with its reference labels)."""
from pathlib import Path

import numpy as np
import pytest

from dicom_node.sample import load_lps_volume, sample_data_dir, sample_labels_lps
from pipeline.bone import measure_mid_body
from pipeline.selection import SelectionError, select_level_slices
from pipeline.volume import Volume, VolumeError, load_volume

L1_LABEL = 31
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def volume(sample_series):
    return load_volume(sample_series.files)


def test_volume_keeps_geometry_and_hu_exactly(volume):
    ref, origin, spacing = load_lps_volume(sample_data_dir() / "example_ct.nii.gz")
    assert volume.hu.dtype == np.int16
    assert volume.shape == ref.shape
    assert np.array_equal(volume.hu, ref.astype(np.int16))
    assert volume.spacing == pytest.approx(spacing)
    assert np.allclose(volume.positions[0], origin, atol=1e-3)


def l1_extent(labels):
    zs = np.nonzero((labels == L1_LABEL).any(axis=(1, 2)))[0]
    return zs.min(), zs.max()


def test_selected_slice_is_inside_l1_by_reference_labels(volume):
    labels = sample_labels_lps()
    sel, loc = select_level_slices(volume, "L1")
    k = measure_mid_body(volume, loc, sel.z_range).slice_index  # the slice the SR and SC report
    counts = np.bincount(labels[k].ravel(), minlength=50)
    vertebrae = {lab: counts[lab] for lab in range(26, 34) if counts[lab]}
    assert max(vertebrae, key=vertebrae.get) == L1_LABEL, f"slice {k}: {vertebrae}"
    lo, hi = l1_extent(labels)
    margin = 0.2 * (hi - lo)
    assert lo + margin <= k <= hi - margin, f"slice {k} not in the middle 60% of L1 ({lo}-{hi})"
    assert sel.confidence > 0


def test_trabecular_roi_lies_in_l1_and_excludes_cortex(volume):
    labels = sample_labels_lps()
    sel, loc = select_level_slices(volume, "L1")
    m = measure_mid_body(volume, loc, sel.z_range)
    r, c = (int(round(v)) for v in m.roi_centre_rc)
    assert labels[m.slice_index, r, c] == L1_LABEL
    poly = np.round(m.roi_polygon_rc).astype(int)
    inside = labels[m.slice_index][poly[:, 0], poly[:, 1]] == L1_LABEL
    assert inside.mean() > 0.95, "ROI outline leaves the L1 label"
    assert m.area_mm2 >= 200
    assert 0 < m.mean_hu < 300 and m.sd_hu < 80, "trabecular bone, not cortex or soft tissue"


def _truncated(volume: Volume, keep: slice) -> Volume:
    return Volume(hu=volume.hu[keep], spacing=volume.spacing, positions=volume.positions[keep],
                  row_direction=volume.row_direction, column_direction=volume.column_direction,
                  slice_refs=volume.slice_refs[keep], header=volume.header,
                  slice_thickness_mm=volume.slice_thickness_mm)


def test_no_rib_anchor_means_no_guess(volume):
    # Cut the scan below T12: no rib-bearing vertebra is in view, so no level may be named.
    labels = sample_labels_lps()
    t12 = np.nonzero((labels == 32).any(axis=(1, 2)))[0].min()
    with pytest.raises(SelectionError, match="rib|not found"):
        select_level_slices(_truncated(volume, slice(0, t12 - 2)), "L1")


def test_real_scanner_slices_without_l1_are_refused():
    # 20 real slices covering T11-T12 only: the answer must be "not found", never a guess.
    files = sorted((DATA / "example_ct_dicom").iterdir())
    with pytest.raises((VolumeError, SelectionError)):
        select_level_slices(load_volume(files), "L1")


def test_jpeg2000_slices_decode(tmp_path):
    import pydicom

    from pipeline.volume import CT_IMAGE_STORAGE

    files = []
    for i, f in enumerate(sorted((DATA / "example_ct_dicom").iterdir())):
        ds = pydicom.dcmread(f)
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.1.{i + 1}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.3"
        ds.save_as(tmp_path / f"{i}.dcm")
        files.append(tmp_path / f"{i}.dcm")
    vol = load_volume(files)  # JPEG 2000 lossless, decoded through the pylibjpeg plugins
    assert vol.shape == (20, 512, 512)
    assert -1100 < vol.hu.min() < -900 and vol.hu.max() > 1000  # air and bone in HU
    with pytest.raises(SelectionError):  # T11-T12 only: L1 is not in view
        select_level_slices(vol, "L1")


def test_duplicate_positions_are_refused(sample_series, tmp_path):
    import pydicom

    files = list(sample_series.files[:50])
    ds = pydicom.dcmread(files[10])
    ds.SOPInstanceUID = "1.2.3.4.5.6.7.8.9"
    dup = tmp_path / "dup.dcm"
    ds.save_as(dup)
    with pytest.raises(VolumeError, match="duplicate"):
        load_volume([*files, dup])


def _rewrite(src, dst, **changes):
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for k, v in changes.items():
        setattr(ds, k, v)
    ds.save_as(dst)
    return dst


def test_mixed_series_keeps_the_axial_stack_and_says_what_it_left_out(sample_series, tmp_path, volume):
    """Localizers and a few sagittal reformats in the same series as the axial stack (seen on real scanners)."""
    files = list(sample_series.files)
    extra = [_rewrite(files[0], tmp_path / f"loc{i}.dcm", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
             for i in range(2)]
    extra += [_rewrite(files[i], tmp_path / f"sag{i}.dcm", ImageOrientationPatient=[0, 1, 0, 0, 0, -1],
                       ImagePositionPatient=[float(i), -150.0, 150.0]) for i in range(3)]
    mixed = load_volume([*extra, *files])
    assert mixed.shape == volume.shape and np.array_equal(mixed.hu, volume.hu)
    notes = " ".join(mixed.notes)
    assert "2 localizer" in notes and "3 slices with another orientation" in notes
    sel, _ = select_level_slices(mixed, "L1")
    assert sel.level == "L1"


def test_gantry_tilt_over_the_limit_is_refused(sample_series, tmp_path):
    import math

    import pydicom

    out = []
    for i, f in enumerate(sample_series.files[:40]):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        out.append(_rewrite(f, tmp_path / f"t{i}.dcm", ImagePositionPatient=[x, y + z * math.tan(math.radians(15)), z]))
    with pytest.raises(VolumeError, match=r"gantry tilt 15\.0 deg exceeds 10\.0 deg"):
        load_volume(out)


def test_variable_slice_spacing_is_refused(sample_series, tmp_path):
    import pydicom

    out = []
    for i, f in enumerate(sample_series.files[:40]):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        shift = 1.0 if i >= 20 else 0.0  # 3 mm, then one 4 mm step, then 3 mm again
        out.append(_rewrite(f, tmp_path / f"v{i}.dcm", ImagePositionPatient=[x, y, z + shift * np.sign(z or 1)]))
    with pytest.raises(VolumeError, match="inconsistent slice spacing|missing slices"):
        load_volume(out)


def test_missing_slices_are_refused(sample_series):
    files = [f for i, f in enumerate(sample_series.files) if i != 40]
    with pytest.raises(VolumeError, match="missing"):
        load_volume(files)


def test_eval_imaging_command_on_the_shipped_case(tmp_path):
    import re
    import shutil
    import subprocess
    import sys

    case = tmp_path / "cases" / "example_ct"
    case.mkdir(parents=True)
    shutil.copy(sample_data_dir() / "example_ct.nii.gz", case / "ct.nii.gz")
    shutil.copy(sample_data_dir() / "totalseg_v2_labels.nii.gz", case / "labels.nii.gz")
    r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "eval", "imaging", str(tmp_path / "cases"),
                        "--variants", "--crop-sweep"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    *_, sweep, last = r.stdout.strip().splitlines()
    assert re.match(r"crop sweep: crops=98 correct=\d+ uncertain=\d+ wrong_confident=0$", sweep), sweep
    m = re.match(r"imaging eval: cases=(\d+) correct=(\d+) uncertain=(\d+) wrong_confident=(\d+) "
                 r"max_hu_err=([0-9.]+)$", last)
    assert m, last
    # the case, its 6 robustness variants and 4 simulated L1 abnormalities (2 fractures, 2 dense lesions)
    assert int(m.group(1)) == 11 and int(m.group(4)) == 0
    assert int(m.group(2)) >= 10 and float(m.group(5)) <= 15.0
    assert "example_ct/l1_compressed_30pct" in r.stdout and "suspected compression fracture of L1" in r.stdout
    assert "example_ct " in r.stdout and "correct" in r.stdout.splitlines()[0]


@pytest.fixture(scope="module")
def multiframe_series(sample_series, tmp_path_factory):
    from dicom_node.sample import write_multiframe_series

    return write_multiframe_series(sample_series, tmp_path_factory.mktemp("multiframe"), tag="tests-mf")


def test_multiframe_ct_gives_the_same_volume_as_the_single_frame_series(volume, multiframe_series):
    mf = load_volume(multiframe_series.files)
    assert np.array_equal(mf.hu, volume.hu) and mf.hu.dtype == np.int16
    assert np.allclose(mf.positions, volume.positions) and mf.spacing == pytest.approx(volume.spacing)
    assert mf.slice_thickness_mm == volume.slice_thickness_mm
    assert sorted(r.frame_number for r in mf.slice_refs) == list(range(1, mf.shape[0] + 1))
    assert len({r.sop_instance_uid for r in mf.slice_refs}) == 1
    assert any("multi-frame" in n for n in mf.notes)


def test_multiframe_without_per_frame_positions_is_refused(multiframe_series, tmp_path):
    import pydicom

    ds = pydicom.dcmread(multiframe_series.files[0])
    for item in ds.PerFrameFunctionalGroupsSequence:
        del item.PlanePositionSequence
    bad = tmp_path / "nopos.dcm"
    ds.save_as(bad)
    with pytest.raises(VolumeError, match="no positioned CT image slices"):
        load_volume([bad])


def test_multiframe_routing_facts_come_from_functional_groups(multiframe_series):
    from config.schema import RoutingSettings
    from dicom_node.routing import decide, series_facts

    facts = series_facts([str(p) for p in multiframe_series.files], "SCANNER")
    assert facts.n_slices == 112 and facts.slice_thickness_mm == 3.0 and facts.tilt_from_axial_deg == 0.0
    assert decide(facts, RoutingSettings()).eligible


def test_enhanced_ct_sop_class_reads_through_the_same_functional_groups(volume, multiframe_series, tmp_path):
    import pydicom

    ds = pydicom.dcmread(multiframe_series.files[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image
    ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0].RescaleIntercept = "-1000"
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path)
    vol = load_volume([path])
    assert vol.slice_refs[0].sop_class_uid == "1.2.840.10008.5.1.4.1.1.2.1"
    assert np.array_equal(vol.hu.astype(np.int32), volume.hu.astype(np.int32) + 24)  # rescale from the groups


def test_thin_slices_are_localised_like_the_source(tmp_path):
    """The real CT resampled to 1.1 mm slices: L1 must stay L1 (thin slices are averaged into ~3 mm slabs).

    Before slab averaging, this series lost the weak T12/L1 disc and named L2 as L1 with confidence 0.7.
    """
    from dicom_node.sample import write_resampled_series

    n = 300
    series = write_resampled_series(tmp_path / "thin", n, matrix=256, tag="thin")
    vol = load_volume(series.files)
    assert vol.spacing[0] == pytest.approx(333.0 / (n - 1), abs=1e-3)
    sel, loc = select_level_slices(vol, "L1")
    labels = sample_labels_lps()
    z = np.nonzero((labels == 31).any(axis=(1, 2)))[0]
    scale = (n - 1) / (labels.shape[0] - 1)
    lo, hi = z.min() * scale, z.max() * scale
    assert lo + 0.2 * (hi - lo) <= sel.centre_index <= hi - 0.2 * (hi - lo), (sel, lo, hi)
    assert loc.body_box_rc.shape[0] == n
    m = measure_mid_body(vol, loc, sel.z_range, level="L1")
    assert 60 < m.mean_hu < 160


def test_metal_in_the_l1_body_makes_it_not_measurable(volume):
    """A pedicle-screw-like rod of metal through the L1 body: refused with the reason, never a HU."""
    from dataclasses import replace as dc_replace

    from pipeline.bone import MetalInBody

    sel, loc = select_level_slices(volume, "L1")
    hu = volume.hu.copy()
    k = int(round(0.5 * (sel.z_range[0] + sel.z_range[1])))
    r0, r1, c0, c1 = loc.body_box_rc[k]
    r, c = int(0.5 * (r0 + r1)), int(0.5 * (c0 + c1))
    hu[k - 1 : k + 2, r - 2 : r + 3, c - 6 : c + 7] = 3071  # 5 x 13 voxels, 3 slices
    with pytest.raises(MetalInBody, match="metal or cement in the L1 body"):
        measure_mid_body(dc_replace(volume, hu=hu), loc, sel.z_range)
    # Dense but plausible bone (a sclerotic island ~ 1000 HU) is not metal.
    hu2 = volume.hu.copy()
    hu2[k, r - 1 : r + 2, c - 1 : c + 2] = 1000
    measure_mid_body(dc_replace(volume, hu=hu2), loc, sel.z_range)


def test_short_lowest_ribs_lower_the_confidence_and_say_so(volume):
    """Transitional anatomy: lowest ribs shortened to ~70 mm reach (a 13th rib or hypoplastic 12th ribs)."""
    from dataclasses import replace as dc_replace

    from pipeline.localiser import localise

    loc = localise(volume)
    assert loc.confidence > 0 and loc.reason is None
    lowest = min(loc.ribs, key=lambda r: r.z_medial)
    assert lowest.lateral_reach_mm >= 75  # the real 12th rib
    hu = volume.hu.copy()
    dx = volume.spacing[2]
    z0 = int(lowest.z_medial) - 12
    cols = np.arange(hu.shape[2])
    for k in range(max(0, z0), hu.shape[0]):
        cx = 0.5 * (loc.body_box_rc[k, 2] + loc.body_box_rc[k, 3])
        far = np.abs(cols - cx) * dx > 70.0
        sl = hu[k]
        sl[:, far] = np.where(sl[:, far] > 200, 40, sl[:, far])  # lateral rib beyond 70 mm -> soft tissue
    short = localise(dc_replace(volume, hu=hu))
    assert short.reason is None and short.confidence == pytest.approx(0.5 * loc.confidence, abs=1e-3)
    note = next(n for n in short.notes if "transitional anatomy" in n)
    import re

    assert re.search(r"lateral reach (6[5-9]|7[0-4]) mm", note) and "13th (lumbar) rib" in note
    assert [s.label for s in short.segments] == [s.label for s in loc.segments]  # said, not silently shifted
    sel, _ = select_level_slices(dc_replace(volume, hu=hu), "L1")
    assert "possible transitional anatomy" in sel.note  # the SR's slice-selection text says it


def _label_disc(labels: np.ndarray, lower: int, upper: int) -> float:
    """Where the ``lower`` vertebra label gives way to ``upper`` along the line through the centre of
    ``upper``'s body (the reference for the localiser's disc centres)."""
    from pipeline.validation import vertebral_body

    body = np.zeros(labels.shape, dtype=bool)
    for k in np.nonzero((labels == upper).any(axis=(1, 2)))[0]:
        body[k] = vertebral_body(labels[k] == upper)
    _, rr, cc = np.nonzero(body)
    line = labels[:, int(round(rr.mean())), int(round(cc.mean()))]
    return 0.5 * (np.nonzero(line == lower)[0].max() + np.nonzero(line == upper)[0].min())


def test_discs_bounding_l1_are_where_the_labels_change(volume):
    """The discs come from the column straightened along its axis: within 4 mm of the label boundaries."""
    from pipeline.localiser import localise

    labels = sample_labels_lps()
    l1 = localise(volume).find("L1")
    dz = volume.spacing[0]
    assert abs(l1.z_lower - _label_disc(labels, 30, 31)) * dz <= 4.0
    assert abs(l1.z_upper - _label_disc(labels, 31, 32)) * dz <= 4.0


def test_rib_heads_are_extrapolated_upwards_into_their_vertebra(volume):
    from pipeline.localiser import RIB_HEAD_MAX_LIFT_MM, localise

    loc = localise(volume)
    dz = volume.spacing[0]
    for rib in loc.ribs:
        assert 0.0 <= (rib.z_anchor - rib.z_medial) * dz <= RIB_HEAD_MAX_LIFT_MM + 1e-6
    lowest = min(loc.ribs, key=lambda r: r.z_anchor)
    t12 = loc.find("T12")
    assert t12.z_lower <= lowest.z_anchor <= t12.z_upper


@pytest.mark.parametrize("loss", [0.30, 0.45])
def test_a_compressed_l1_is_a_suspected_fracture_and_is_not_measured(volume, loss):
    """The real CT with its L1 body lowered by 30 / 45 % (Genant grades 2 and 3, the column above moved
    down onto it): the fracture is reported in its own right and L1 gets no HU; never a wrong level."""
    from pipeline.bone import FracturedBody, MeasurementError
    from pipeline.localiser import FRACTURE_RATIO, localise
    from pipeline.validation import compress_vertebra, evaluate

    assert localise(volume).fractures == ()  # the intact spine: no finding
    labels = sample_labels_lps()
    compressed, labels_c = compress_vertebra(volume, labels, loss)
    loc = localise(compressed)
    result = evaluate("compressed", compressed, labels_c, expect="fracture", localisation=loc)
    assert result.status in ("correct", "uncertain") and not result.claimed  # never a claimed L1 HU
    if result.status == "uncertain":  # a refusal must say why
        assert result.reason
        return
    fracture = loc.fracture_of("L1")
    assert fracture is not None and fracture.ratio < FRACTURE_RATIO
    assert "suspected compression fracture of L1" in fracture.text
    sel, _ = select_level_slices(compressed, "L1", localisation=loc)
    with pytest.raises(FracturedBody, match="L1 not measured"):
        measure_mid_body(compressed, loc, sel.z_range)
    assert isinstance(FracturedBody("x"), MeasurementError)  # so the job measures T12 / L2 instead


def test_a_bone_island_is_left_out_and_a_large_lesion_makes_l1_not_measurable(volume):
    from pipeline.bone import LesionInBody
    from pipeline.validation import add_dense_lesion

    labels = sample_labels_lps()
    sel, loc = select_level_slices(volume, "L1")
    clean = measure_mid_body(volume, loc, sel.z_range)
    assert clean.lesion_pixels == 0
    island = add_dense_lesion(volume, labels, 8.0)  # 1000 HU, 8 mm: a bone island
    m = measure_mid_body(island, loc, sel.z_range)
    assert abs(m.mean_hu - clean.mean_hu) < 15 and m.mean_hu < 200
    large = add_dense_lesion(volume, labels, 24.0)  # fills the body's centre
    with pytest.raises(LesionInBody, match="focal dense lesion fills"):
        measure_mid_body(large, loc, sel.z_range)


def test_spine_axis_samples_trilinearly():
    from pipeline.spine_axis import _sample

    z, r, c = np.meshgrid(np.arange(6), np.arange(7), np.arange(8), indexing="ij")
    hu = (10 * z + 3 * r - 2 * c).astype(np.int16)
    pts = np.array([[1.5, 2.25, 3.75], [0.0, 0.0, 0.0], [4.9, 6.0, 7.0]])
    got = _sample(hu, pts[:, 0], pts[:, 1], pts[:, 2])
    assert got == pytest.approx(10 * pts[:, 0] + 3 * pts[:, 1] - 2 * pts[:, 2])
    assert np.isnan(_sample(hu, np.array([-1.0]), np.array([0.0]), np.array([0.0])))[0]


def test_a_disc_just_inside_the_scan_edge_is_not_suppressed_by_the_edge():
    from pipeline.localiser import DISC_EDGE_MARGIN_MM, MIN_DISC_GAP_MM, _disc_peaks

    # The disc score of a column cut 7 mm above a disc: the dark stretch at the edge answers the top-hat more
    # strongly than the disc (as on the chest CT cut just above its T12/L1 disc, found by the crop sweep).
    score = np.zeros(85)
    score[15] = 60.0
    score[76:79] = (49.0, 67.0, 57.0)  # the disc, 7 mm from the end
    score[82:85] = (29.0, 55.0, 109.0)  # the edge
    assert 84 - 77 > DISC_EDGE_MARGIN_MM and 84 - 77 < MIN_DISC_GAP_MM
    assert _disc_peaks(score, 20.0, 1.0) == [15.0, 77.5]


def test_crop_sweep_of_the_shipped_case_never_claims_a_wrong_level(tmp_path):
    import shutil

    from pipeline.validation import run_crop_sweep

    case = tmp_path / "example_ct"
    case.mkdir()
    shutil.copy(sample_data_dir() / "example_ct.nii.gz", case / "ct.nii.gz")
    shutil.copy(sample_data_dir() / "totalseg_v2_labels.nii.gz", case / "labels.nii.gz")
    lines: list[str] = []
    results = run_crop_sweep(tmp_path, out=lines.append)
    assert lines[-1] == (f"crop sweep: crops={len(results)} correct={sum(r.status == 'correct' for r in results)} "
                         f"uncertain={sum(r.status == 'uncertain' for r in results)} wrong_confident=0")
    # 112 slices of 3 mm, cut every 6 mm from either end while 40 mm remain
    assert len(results) == 2 * 49
    assert {r.case.split("/")[1].split("_")[0] for r in results} == {"top", "bottom"}
    # L1 is measured within 15 HU wherever the scan keeps it and the ribs above it
    measured = [r for r in results if r.claimed]
    assert len(measured) >= 40 and all(r.hu_error <= 15.0 for r in measured)


def test_a_scan_ending_just_below_l1_is_not_counted_from_the_ribs(volume):
    from pipeline.localiser import MIN_SCAN_BELOW_L1_MM
    from pipeline.validation import volume_from_array

    def cropped(cut: int):
        return volume_from_array(volume.hu[cut:], volume.spacing, volume.positions[cut])

    # L1's lower disc lies 24 mm above the lower edge: the 12th ribs are whole in view, L1 is measured
    sel, loc = select_level_slices(cropped(84))
    assert sel.level == "L1" and loc.find("L1").z_lower * volume.spacing[0] >= MIN_SCAN_BELOW_L1_MM
    # 17 mm: lower ribs could lie cut off below the edge, so the count from the ribs is not trusted
    with pytest.raises(SelectionError, match=r"the scan ends 1\d mm below L1: a lower pair of ribs"):
        select_level_slices(cropped(86))


def test_a_vertebra_between_both_lungs_is_never_named_l1(volume):
    from scipy import ndimage as ndi

    from pipeline.localiser import localise
    from pipeline.validation import volume_from_array

    # A thoracic scan that ends mid-chest cuts off its lowest vertebrae's descending ribs, so a rib-bearing
    # vertebra can be taken for L1 (the chest CT at 1 mm, cut 180 mm from the bottom). Give the real L1 lungs on
    # both sides (soft tissue beside the spine turned to air, bone kept): the count from the ribs is refused.
    hu = volume.hu.copy()
    l1 = localise(volume).find("L1")
    assert l1 is not None
    mm = volume.spacing[1]
    for k in range(int(np.ceil(l1.z_lower)), int(l1.z_upper) + 1):
        inner = ndi.binary_erosion(ndi.binary_fill_holes(hu[k] > -400), iterations=int(15 / mm))  # chest wall kept
        cols = np.arange(hu.shape[2])
        spine = np.nonzero(hu[k][:, cols.size // 3 : 2 * cols.size // 3] > 200)[1].mean() + cols.size // 3
        beside = (np.abs(cols - spine) * mm >= 45)[None, :]
        hu[k][inner & beside & (hu[k] > -200) & (hu[k] < 200)] = -850
    with pytest.raises(SelectionError, match="lies between both lungs"):
        select_level_slices(volume_from_array(hu, volume.spacing, volume.positions[0]))


def test_levels_are_found_on_a_miscalibrated_scanner_and_the_study_stays_flagged(volume):
    from pipeline.calibration import check_calibration
    from pipeline.localiser import localise
    from pipeline.validation import volume_from_array

    # Every HU 60 too high (air -940, fat -40): the localiser's HU thresholds no longer fit, and without a
    # correction its discs merged ("L1 would span 72 mm"). It finds the anatomy on HU mapped back onto nominal
    # air and fat; the stored HU, and so the measurement, stay as they are and the check flags them.
    shifted = volume_from_array(np.clip(volume.hu.astype(np.int32) + 60, -32768, 32767), volume.spacing,
                                volume.positions[0])
    assert check_calibration(shifted).plausible is False
    unshifted = localise(volume)
    before, after = unshifted.find("L1"), localise(shifted)
    assert after.reason is None and after.find("L1") is not None
    assert abs(after.find("L1").z_lower - before.z_lower) <= 1 and abs(after.find("L1").z_upper - before.z_upper) <= 1
    assert any(n.startswith("HU calibration implausible: levels found on HU x 1.0") for n in after.notes)
    assert not any("calibration" in n for n in unshifted.notes)


@pytest.mark.parametrize("changes,match", [
    ({"RescaleIntercept": None}, "no valid rescale to HU on 1 slice"),
    ({"RescaleSlope": 0}, "no valid rescale to HU"),
    ({"RescaleType": "US"}, "RescaleType not HU"),
])
def test_a_slice_without_a_trustworthy_rescale_is_refused_not_guessed(sample_series, tmp_path, changes, match):
    """RescaleIntercept is Type 1 in a CT image: assuming 0 shifts that slice by about +1024 HU, which the
    localiser read as a compressed L1 (a false fracture finding) before this check."""
    import pydicom

    files = list(sample_series.files)
    ds = pydicom.dcmread(files[60])
    for kw, value in changes.items():
        if value is None:
            delattr(ds, kw)
        else:
            setattr(ds, kw, value)
    files[60] = tmp_path / "bad.dcm"
    ds.save_as(files[60])
    with pytest.raises(VolumeError, match=match):
        load_volume(files)


@pytest.mark.parametrize("keyword,value", [("ImagePositionPatient", [float("nan"), 0.0, 0.0]),
                                           ("PixelSpacing", [0.0, 0.0])])
def test_non_finite_or_zero_geometry_is_left_out_not_trusted(sample_series, tmp_path, keyword, value):
    files = list(sample_series.files[:40])
    files[20] = _rewrite(files[20], tmp_path / "bad.dcm", **{keyword: value})
    with pytest.raises(VolumeError, match="missing slices"):  # that slice is left out: a gap, not a crash
        load_volume(files)


def test_a_multiframe_header_claiming_billions_of_voxels_is_refused_before_allocating(multiframe_series, tmp_path):
    import pydicom

    ds = pydicom.dcmread(multiframe_series.files[0])
    ds.NumberOfFrames = 2_000_000_000
    bomb = tmp_path / "bomb.dcm"
    ds.save_as(bomb)
    with pytest.raises(VolumeError, match="claims 2000000000 frames"):
        load_volume([bomb])


def test_a_stored_file_gone_is_a_storage_fault_not_a_refusal(sample_series, tmp_path):
    """The node's own file missing (or unreadable) must fail the job visibly and be retried, never turn into
    'image not usable' and a demographics-only screen."""
    files = [*sample_series.files[:30], tmp_path / "gone.dcm"]
    with pytest.raises(FileNotFoundError):
        load_volume(files)
