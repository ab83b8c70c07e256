"""The tabular inputs of the fused model: names, units, LOINC codes and NHANES variables.

One list, used by training (NHANES columns), by the service (LOINC codes from
HL7, demographics from the DICOM header) and by the SR (names and units).
Canonical units are the NHANES units, which the lab mapping table (hl7/lab_mapping.toml) converts to.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Feature:
    name: str
    label: str
    unit: str
    group: str  # "demographics" or "labs"
    loinc: tuple[str, ...] = ()  # accepted LOINC codes (canonical first)
    nhanes: tuple[str, ...] = ()  # NHANES variable names across cycles
    short: str = ""  # label for narrow places (the key image's factor chart); defaults to ``label``

    @property
    def short_label(self) -> str:
        return self.short or self.label


FEATURES: tuple[Feature, ...] = (
    Feature("age", "Age", "a", "demographics", nhanes=("RIDAGEYR",)),
    Feature("female", "Female sex", "{boolean}", "demographics", nhanes=("RIAGENDR",)),
    Feature("height", "Height", "cm", "demographics", nhanes=("BMXHT",)),
    Feature("weight", "Weight", "kg", "demographics", nhanes=("BMXWT",)),
    Feature("bmi", "Body mass index", "kg/m2", "demographics", nhanes=("BMXBMI",)),
    Feature("calcium", "Calcium", "mg/dL", "labs", ("17861-6",), ("LBXSCA",)),
    Feature("phosphate", "Phosphate", "mg/dL", "labs", ("2777-1",), ("LBXSPH",)),
    Feature("alp", "Alkaline phosphatase", "U/L", "labs", ("6768-6",), ("LBXSAPSI",), short="ALP"),
    Feature("albumin", "Albumin", "g/dL", "labs", ("1751-7",), ("LBXSAL",)),
    Feature("creatinine", "Creatinine", "mg/dL", "labs", ("2160-0",), ("LBXSCR",)),
    Feature("total_protein", "Total protein", "g/dL", "labs", ("2885-2",), ("LBXSTP",)),
    Feature("glucose", "Glucose", "mg/dL", "labs", ("2345-7",), ("LBXSGL",)),
    Feature("vitamin_d", "25-hydroxyvitamin D", "nmol/L", "labs", ("62292-8", "1989-3"), ("LBXVIDMS", "LBDVIDMS"),
            short="25-OH vitamin D"),
    Feature("hemoglobin", "Hemoglobin", "g/dL", "labs", ("718-7",), ("LBXHGB",)),
    Feature("wbc", "Leukocytes", "10*3/uL", "labs", ("6690-2",), ("LBXWBCSI",)),
    Feature("platelets", "Platelets", "10*3/uL", "labs", ("777-3",), ("LBXPLTSI",)),
)
FEATURE_NAMES = tuple(f.name for f in FEATURES)
DEMOGRAPHIC_IDX = tuple(i for i, f in enumerate(FEATURES) if f.group == "demographics")
LAB_IDX = tuple(i for i, f in enumerate(FEATURES) if f.group == "labs")
