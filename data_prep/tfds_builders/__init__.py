"""TFDS builders (array_record file format, `manual_dir` = the dataset root) for MIMIC-IV-ECG and
PTB-XL. Importing this package registers them; no TensorFlow is needed to build or read:

    import tensorflow_datasets as tfds, data_prep.tfds_builders
    builder = tfds.builder("uniecg_ptbxl/plain", data_dir=DATA_DIR)
    builder.download_and_prepare(file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir="/data/ptb-xl"))
    source = tfds.data_source("uniecg_ptbxl/plain", data_dir=DATA_DIR)["train"]  # random access
"""
from data_prep.tfds_builders.mimic_iv_ecg import UniecgMimicIvEcg
from data_prep.tfds_builders.ptbxl import UniecgPtbxl

__all__ = ["UniecgMimicIvEcg", "UniecgPtbxl"]
