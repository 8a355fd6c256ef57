"""Readers, one module per source: PhysioNet Challenge 2021 (`cinc`), PTB-XL (`ptbxl`),
MIMIC-IV-ECG (`mimic`), ECG-Grounding / ECGInstruct LLaVA JSON (`grounding`). Each returns
`ECGRecord`s and raises `RecordError` naming the file and the problem."""
