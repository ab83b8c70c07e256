"""HL7 v2 lab results: MLLP framing and listener, strict receipt checks, ACKs,
a durable message store, LOINC mapping with unit normalisation, and the
lookup that turns stored results into a LabPanel. Does not depend on dicom_node."""
