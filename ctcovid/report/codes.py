"""The coded concepts the ctcovid report uses, in one place so that reader and writer agree.

Meanings are taken from the DICOM code tables that pydicom ships where the code is listed there;
COVID-19 (SNOMED CT 840539006) and the IHE "Processing Algorithm" purpose are not, and are spelt
out here.
"""

from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

#: Finding reported by the measurement group (SNOMED CT 840539006).
COVID_19 = CodedConcept(value="840539006", scheme_designator="SCT", meaning="COVID-19")

#: Finding site of the measurement group.
LUNG = CodedConcept(value="39607008", scheme_designator="SCT", meaning="Lung")

#: Values of the qualitative evaluation of COVID_19.
PRESENT = CodedConcept(value="52101004", scheme_designator="SCT", meaning="Present")
ABSENT = CodedConcept(value="272519000", scheme_designator="SCT", meaning="Absent")
INDETERMINATE = CodedConcept(value="82334004", scheme_designator="SCT", meaning="Indeterminate")

#: Concept name of the numeric result; the value is a probability in [0, 1].
PROBABILITY = CodedConcept(value="122157", scheme_designator="DCM", meaning="Probability")

#: Unit of PROBABILITY: a dimensionless fraction, not a percentage.
UNIT_NO_UNITS = CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")

#: Procedure reported (LOINC 24627-2, "CT Chest").
CT_CHEST = CodedConcept(value="24627-2", scheme_designator="LN", meaning="CT Chest")

#: Algorithm family of TID 4019.
ARTIFICIAL_INTELLIGENCE = CodedConcept.from_code(codes.DCM.ArtificialIntelligence)

#: Observer type of TID 1002: the report is made by a device, not a person.
OBSERVER_DEVICE = CodedConcept.from_code(codes.cid270.Device)

#: Purpose of reference of the algorithm's Contributing Equipment item (IHE AI Results).
PROCESSING_ALGORITHM = CodedConcept(
    value="Newcode1", scheme_designator="99IHE", meaning="Processing Algorithm"
)

#: Concept names checked when reading a report back.
FINDING = CodedConcept(value="121071", scheme_designator="DCM", meaning="Finding")
FINDING_SITE = CodedConcept(value="363698007", scheme_designator="SCT", meaning="Finding Site")
MEASUREMENT_GROUP = CodedConcept(
    value="125007", scheme_designator="DCM", meaning="Measurement Group"
)
