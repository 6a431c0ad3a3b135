"""data_prep: offline DICOM/AVI + reports -> de-identified, indexed TFRecords. Never imports JAX."""
