"""The direct read of uncompressed 16-bit slices gives pydicom's values; anything else is left to pydicom."""
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (CTImageStorage, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         generate_uid)

from dicom_node.sample import sample_data_dir
from pipeline.volume import _header, _native_frame, load_volume


def _write(path, *, syntax=ExplicitVRLittleEndian, signed=0, bits_stored=16, bits_allocated=16, rows=5, cols=7,
           data: bytes | None = None, trailing=False, frames=None):
    rng = np.random.default_rng(bits_stored + 10 * signed)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = CTImageStorage
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (bits_allocated, bits_stored,
                                                                           bits_stored - 1, signed)
    if frames is not None:
        ds.NumberOfFrames = frames
    n = rows * cols * (frames or 1)
    ds.PixelData = data if data is not None else (
        rng.integers(0, 2**16, size=n, dtype=np.uint16).astype("<u2").tobytes() if bits_allocated == 16
        else rng.integers(0, 256, size=n, dtype=np.uint8).tobytes())
    if trailing:
        ds.add_new(0xFFFCFFFC, "OB", b"\x00" * 8)  # Data Set Trailing Padding after the pixels
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("signed", [0, 1])
@pytest.mark.parametrize("bits_stored", [12, 15, 16])
@pytest.mark.parametrize("trailing", [False, True])
def test_direct_read_equals_pydicom(tmp_path, syntax, signed, bits_stored, trailing):
    path = _write(tmp_path / "x.dcm", syntax=syntax, signed=signed, bits_stored=bits_stored, trailing=trailing)
    header, offset = _header(path)
    got = _native_frame(path, offset, header)
    expected = pydicom.dcmread(path).pixel_array
    assert got is not None
    assert got.dtype == expected.dtype and np.array_equal(got, expected)


def test_other_encodings_are_left_to_pydicom(tmp_path):
    cases = {
        "8-bit": _write(tmp_path / "a.dcm", bits_allocated=8, bits_stored=8),
        "big endian": _write(tmp_path / "b.dcm", syntax=ExplicitVRBigEndian),
        "multi-frame": _write(tmp_path / "c.dcm", frames=2),
        "padded pixel data": _write(tmp_path / "d.dcm", data=b"\x01\x00" * 35 + b"\x00\x00"),
        "compressed": sample_data_dir() / "RG1_J2KR.dcm",
    }
    for name, path in cases.items():
        header, offset = _header(path)
        assert _native_frame(path, offset, header) is None, name


def test_sample_series_volume_is_unchanged_by_the_direct_read(sample_series, monkeypatch):
    direct = load_volume(sample_series.files)
    monkeypatch.setattr("pipeline.volume._native_frame", lambda *a: None)
    via_pydicom = load_volume(sample_series.files)
    assert np.array_equal(direct.hu, via_pydicom.hu)


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.5"], ids=["jpeg-ls", "rle"])
def test_a_compressed_slice_cut_short_is_refused_not_decoded_partly(sample_series, tmp_path, syntax):
    """A JPEG-LS frame cut to a third decoded without a word (66 % of its pixels wrong, moving the probability
    through the model's 2.5D patch): refused now, like a cut RLE frame; intact frames decode exactly."""
    from pydicom.encaps import encapsulate, generate_frames

    from pipeline.volume import VolumeError

    files = list(sample_series.files[:30])
    out = []
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.compress(syntax, generate_instance_uid=False)
        path = tmp_path / f"{i:03d}.dcm"
        ds.save_as(path)
        out.append(path)
    assert np.array_equal(load_volume(out).hu, load_volume(files).hu)
    if syntax != "1.2.840.10008.1.2.5":  # bytes after the end-of-image marker are allowed, as pydicom allows them
        padded = pydicom.dcmread(out[5])
        padded.PixelData = encapsulate([next(generate_frames(padded.PixelData, number_of_frames=1)) + b"\x20\x20"])
        padded.save_as(out[5])
        assert np.array_equal(load_volume(out).hu, load_volume(files).hu)
    ds = pydicom.dcmread(out[15])
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    keep = len(frame) // 3
    ds.PixelData = encapsulate([frame[:keep + keep % 2]])
    ds.save_as(out[15])
    with pytest.raises(VolumeError, match="cut short|decode"):
        load_volume(out)
