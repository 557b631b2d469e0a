"""The patient- and study-level modules that every object made from a source series copies.

Keyword lists of the top-level attributes of each module as PS3.3 defines them; an SR or
Secondary Capture that files into the source study carries every one of them the source has. The
header scan reads them (``HEADER_TAGS``), so nothing is lost between the scan and the report.
"""

from __future__ import annotations

#: Patient Module, PS3.3 C.7.1.1.
PATIENT_MODULE: tuple[str, ...] = (
    "ReferencedPatientSequence",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "TypeOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "SourcePatientGroupIdentificationSequence",
    "GroupOfPatientsIdentificationSequence",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientBirthDateInAlternativeCalendar",
    "PatientDeathDateInAlternativeCalendar",
    "PatientAlternativeCalendar",
    "PatientSex",
    "QualityControlSubject",
    "StrainDescription",
    "StrainNomenclature",
    "StrainStockSequence",
    "StrainAdditionalInformation",
    "StrainCodeSequence",
    "GeneticModificationsSequence",
    "OtherPatientNames",
    "OtherPatientIDsSequence",
    "ReferencedPatientPhotoSequence",
    "EthnicGroupCodeSequence",
    "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence",
    "PatientBreedDescription",
    "PatientBreedCodeSequence",
    "BreedRegistrationSequence",
    "ResponsiblePerson",
    "ResponsiblePersonRole",
    "ResponsibleOrganization",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
)

#: Clinical Trial Subject Module, PS3.3 C.7.1.3.
CLINICAL_TRIAL_SUBJECT_MODULE: tuple[str, ...] = (
    "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName",
    "IssuerOfClinicalTrialProtocolID",
    "OtherClinicalTrialProtocolIDsSequence",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "IssuerOfClinicalTrialSiteID",
    "ClinicalTrialSubjectID",
    "IssuerOfClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    "IssuerOfClinicalTrialSubjectReadingID",
    "ClinicalTrialProtocolEthicsCommitteeName",
    "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
)

#: General Study Module, PS3.3 C.7.2.1.
GENERAL_STUDY_MODULE: tuple[str, ...] = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianName",
    "ConsultingPhysicianIdentificationSequence",
    "StudyDescription",
    "ProcedureCodeSequence",
    "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence",
    "ReferencedStudySequence",
    "StudyInstanceUID",
    "StudyID",
    "RequestingService",
    "RequestingServiceCodeSequence",
    "ReasonForPerformedProcedureCodeSequence",
)

#: Patient Study Module, PS3.3 C.7.2.2.
PATIENT_STUDY_MODULE: tuple[str, ...] = (
    "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence",
    "PatientAge",
    "PatientSize",
    "PatientSizeCodeSequence",
    "PatientBodyMassIndex",
    "MeasuredAPDimension",
    "MeasuredLateralDimension",
    "PatientWeight",
    "MedicalAlerts",
    "Allergies",
    "Occupation",
    "SmokingStatus",
    "AdditionalPatientHistory",
    "PregnancyStatus",
    "LastMenstrualDate",
    "PatientSexNeutered",
    "ReasonForVisit",
    "ReasonForVisitCodeSequence",
    "AdmissionID",
    "IssuerOfAdmissionIDSequence",
    "ServiceEpisodeID",
    "ServiceEpisodeDescription",
    "IssuerOfServiceEpisodeIDSequence",
    "PatientState",
)

#: Clinical Trial Study Module, PS3.3 C.7.2.3.
CLINICAL_TRIAL_STUDY_MODULE: tuple[str, ...] = (
    "ClinicalTrialTimePointID",
    "ClinicalTrialTimePointDescription",
    "LongitudinalTemporalOffsetFromEvent",
    "LongitudinalTemporalEventType",
    "ClinicalTrialTimePointTypeCodeSequence",
    "IssuerOfClinicalTrialTimePointID",
    "ConsentForClinicalTrialUseSequence",
)

#: Of the Clinical Trial Series Module (PS3.3 C.7.3.2), what every series of a trial shares; the
#: series' own ID and description name the source series, not the derived one, and stay behind.
CLINICAL_TRIAL_SERIES_SHARED: tuple[str, ...] = ("ClinicalTrialCoordinatingCenterName",)

#: The modules a derived object copies from its source, in order.
COPIED_MODULES: dict[str, tuple[str, ...]] = {
    "Patient": PATIENT_MODULE,
    "Clinical Trial Subject": CLINICAL_TRIAL_SUBJECT_MODULE,
    "General Study": GENERAL_STUDY_MODULE,
    "Patient Study": PATIENT_STUDY_MODULE,
    "Clinical Trial Study": CLINICAL_TRIAL_STUDY_MODULE,
    "Clinical Trial Series (shared)": CLINICAL_TRIAL_SERIES_SHARED,
}

#: Every attribute copied from the source, once each.
COPIED_KEYWORDS: tuple[str, ...] = tuple(
    dict.fromkeys(keyword for module in COPIED_MODULES.values() for keyword in module)
)

#: What else a derived object needs of its source: the character set its text is in, the time
#: zone its dates and times are in (SOP Common, PS3.3 C.12.1) and the requests it fulfils
#: (General Series, PS3.3 C.7.3.1), which become the SR's ReferencedRequestSequence.
CONTEXT_KEYWORDS: tuple[str, ...] = (
    "SpecificCharacterSet",
    "TimezoneOffsetFromUTC",
    "RequestAttributesSequence",
    "SeriesNumber",
    "SeriesDescription",
)

#: Keywords the header scan must read for the report: the copied modules and their context.
REPORT_HEADER_KEYWORDS: tuple[str, ...] = tuple(
    dict.fromkeys((*COPIED_KEYWORDS, *CONTEXT_KEYWORDS))
)
