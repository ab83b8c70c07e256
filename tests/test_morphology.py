"""The fast morphology and downsampling give the reference answers pixel for pixel (real CT, random data)."""
import numpy as np
import pytest
from scipy import ndimage as ndi

from pipeline.calibration import _depth_in
from pipeline.morphology import component_sizes, fill_holes
from pipeline.volume import load_volume


@pytest.fixture(scope="module")
def sample_volume(sample_series):
    return load_volume(sample_series.files)


def _masks(sample_volume) -> list[np.ndarray]:
    rng = np.random.default_rng(20261206)
    hu = sample_volume.hu
    real = [hu[k] > t for k in range(0, hu.shape[0], max(1, hu.shape[0] // 12)) for t in (-500, -400, 150, 200)]
    noise = [rng.random(shape) < p for shape in ((64, 80), (7, 3), (1, 9)) for p in (0.3, 0.5, 0.6, 0.7)
             for _ in range(5)]
    edge = [np.zeros((5, 5), bool), np.ones((5, 5), bool), np.pad(np.ones((3, 3), bool), 1),
            np.pad(np.zeros((3, 3), bool), 1, constant_values=True), rng.random((6, 7, 8)) < 0.6]
    return real + noise + edge


def test_fill_holes_equals_scipy(sample_volume):
    masks = _masks(sample_volume)
    for m in masks:
        assert np.array_equal(fill_holes(m), ndi.binary_fill_holes(m))
    ring = np.pad(np.pad(np.zeros((3, 3), bool), 1, constant_values=True), 2)
    assert fill_holes(ring)[4, 4] and not fill_holes(ring)[0, 0]  # a hole is filled, the outside is not


def test_component_sizes_equal_scipy(sample_volume):
    for m in _masks(sample_volume):
        lbl, n = ndi.label(m)
        expected = ndi.sum_labels(np.ones_like(lbl), lbl, index=np.arange(1, n + 1))
        assert np.array_equal(component_sizes(lbl, n), expected)


@pytest.mark.parametrize("spacing", [(0.7148, 0.7148), (0.9, 0.6)])
def test_depth_over_the_bounding_box_equals_the_whole_slice(sample_volume, spacing):
    for k in range(0, sample_volume.hu.shape[0], max(1, sample_volume.hu.shape[0] // 6)):
        body = fill_holes(sample_volume.hu[k] > -500)
        depth = ndi.distance_transform_edt(body, sampling=spacing)
        assert np.array_equal(_depth_in(body, spacing, 2.0, 20.0), (depth > 2.0) & (depth <= 20.0))
    assert not _depth_in(np.zeros((8, 8), bool), spacing, 2.0, 20.0).any()


@pytest.mark.parametrize("shape,spacing", [((10, 37, 41), (1.0, 0.7, 0.7)), ((7, 64, 64), (0.5, 0.5, 0.5)),
                                           ((5, 30, 30), (3.0, 1.5, 1.5))])
def test_localiser_downsample_equals_a_reshape_mean(shape, spacing):
    from pipeline.localiser import _downsample

    hu = np.random.default_rng(7).integers(-3024, 3071, size=shape).astype(np.int16)
    out, sp, f, fz = _downsample(hu, spacing)
    z, y, x = hu.shape
    y2, x2 = y // f * f, x // f * f
    for k in range(out.shape[0]):
        slab = hu[k * fz : (k + 1) * fz, :y2, :x2].astype(np.int64)
        mean = slab.sum(axis=0).reshape(y2 // f, f, x2 // f, f).sum(axis=(1, 3)) / (slab.shape[0] * f * f)
        assert np.array_equal(out[k], mean.astype(np.int16))
    assert sp == (spacing[0] * fz, spacing[1] * f, spacing[2] * f)


@pytest.mark.parametrize("half", [0, 1, 4, 12])
def test_slab_any_equals_a_maximum_filter(sample_volume, half):
    from pipeline.morphology import slab_any

    rng = np.random.default_rng(half)
    for mask in (sample_volume.hu > 200, rng.random((9, 11, 13)) < 0.05, np.zeros((1, 4, 4), bool)):
        expected = ndi.maximum_filter1d(mask.view(np.uint8), size=2 * half + 1, axis=0).astype(bool)
        assert np.array_equal(slab_any(mask, half), expected)


def test_close_planes_equals_scipy_closing_per_plane(sample_volume):
    from pipeline.localiser import _disk
    from pipeline.morphology import close_planes

    rng = np.random.default_rng(3)
    for structure in (_disk(3.0, 1.5), _disk(3.0, 0.7), np.ones((3, 3), bool)):
        for stack in (sample_volume.hu[::10] > 200, rng.random((4, 23, 31)) < 0.4, np.ones((2, 5, 5), bool),
                      np.ones((1, 2, 3), bool)):
            expected = np.stack([ndi.binary_closing(p, structure) for p in stack])
            assert np.array_equal(close_planes(stack, structure), expected)
    with pytest.raises(ValueError):
        close_planes(np.zeros((1, 4, 4), bool), np.array([[1, 1, 0]], bool))
    with pytest.raises(ValueError):
        close_planes(np.zeros((1, 4, 4), bool), np.zeros((3, 3), bool))
