"""The algorithm as DICOM equipment: the Contributing Equipment item IHE AI Results asks for."""

from __future__ import annotations

from pydicom.dataset import Dataset

from ctcovid import __version__
from ctcovid.report.codes import PROCESSING_ALGORITHM
from ctcovid.results import ModelInfo

MANUFACTURER = "ctcovid"
MANUFACTURER_MODEL_NAME = "ctcovid"


def software_versions(model: ModelInfo) -> list[str]:
    """Versions of the program and of the model weights, in that order."""
    return [f"ctcovid {__version__}", f"{model.name} {model.version}"]


def algorithm_equipment_item(model: ModelInfo) -> Dataset:
    """Return a Contributing Equipment Sequence item naming the algorithm.

    highdicom's ``ContributingEquipment`` accepts only the DCM purposes of reference, while
    IHE AI Results names the algorithm with (Newcode1, 99IHE, "Processing Algorithm") and
    identifies it by Device UID, which highdicom does not offer; hence a plain item.
    """
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = [PROCESSING_ALGORITHM]
    item.Manufacturer = MANUFACTURER
    item.ManufacturerModelName = model.name
    item.SoftwareVersions = software_versions(model)
    item.DeviceUID = model.device_uid
    item.ContributionDescription = "COVID-19 classification of chest CT"
    return item


def add_algorithm_equipment(ds: Dataset, model: ModelInfo) -> None:
    """Append the algorithm's item to the Contributing Equipment Sequence of ``ds``."""
    if "ContributingEquipmentSequence" not in ds:
        ds.ContributingEquipmentSequence = []
    # Through the data element: highdicom types the attribute as its own item class only.
    ds["ContributingEquipmentSequence"].value.append(algorithm_equipment_item(model))
