"""Training, evaluation and export, a front: from labelled scans to a model artifact.

``config`` (TrainConfig) -> ``data`` (COV19-CT-DB and DICOM layouts), ``split``, ``cache``
(slices through the model's ingest) and ``feed`` -> ``stages`` (freezing, compiling) and
``train`` -> ``metrics`` and ``evaluate``; ``export`` adds the ONNX graphs, gated on scans.
"""
