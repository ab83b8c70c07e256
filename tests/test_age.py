"""Age at the study by the calendar: a patient on their 50th birthday is 50, and reasons never round up."""
import datetime as dt

from pydicom.dataset import Dataset

from config.schema import RoutingSettings
from dicom_node.routing import SeriesFacts, _age_refusal
from pipeline.demographics import age_years, calendar_age


def _header(born: str, seen: str) -> Dataset:
    ds = Dataset()
    ds.PatientBirthDate, ds.StudyDate = born, seen
    return ds


def test_a_birthday_reached_counts_as_a_completed_year():
    assert age_years(_header("20000301", "20500301")) == 50.0  # was 49.9986 (days / 365.25): refused at 50
    assert int(age_years(_header("20000301", "20500228"))) == 49
    assert int(age_years(_header("20000229", "20500228"))) == 49 and age_years(_header("20000229", "20500301")) == 50
    assert calendar_age(dt.date(1974, 8, 1), dt.date(2024, 3, 1)) == 49 + 213 / 366


def test_a_refusal_for_age_states_the_completed_years():
    facts = SeriesFacts(modality="CT", image_type=("ORIGINAL", "PRIMARY"), tilt_from_axial_deg=0.0,
                        slice_thickness_mm=1.0, n_slices=100, calling_aet="CT1", age_years=49.6, sop_classes=())
    refusal = _age_refusal(facts, RoutingSettings())
    assert refusal is not None and refusal.reason == "patient age 49 below 50"  # was "patient age 50 below 50"
    assert _age_refusal(SeriesFacts(**{**facts.__dict__, "age_years": 50.0}), RoutingSettings()) is None


def test_patient_age_that_disagrees_with_the_birth_date_is_noted():
    """Age is the model's largest input: a PatientAge a year or more off the birth date is reported."""
    from pydicom.dataset import Dataset

    from pipeline.demographics import demographics_from_header

    ds = Dataset()
    ds.PatientAge, ds.PatientBirthDate, ds.PatientSex = "067Y", "19580312", "F"
    ds.StudyDate = "20260105"  # 67 by the calendar too
    assert demographics_from_header(ds).notes == ()
    ds.StudyDate = "20261207"  # 68 by the birth date
    assert demographics_from_header(ds).notes == (
        "PatientAge 067Y and the birth date (68 y at the study) disagree: PatientAge used",)
