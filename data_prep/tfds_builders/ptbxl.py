"""TFDS builder for PTB-XL (manual download: the PhysioNet folder with ptbxl_database.csv,
scp_statements.csv and records500/ in manual_dir)."""
from __future__ import annotations

import tensorflow_datasets as tfds

from data_prep.tfds_builders import common
from uniecg_jax.data.readers.ptbxl import PTBXLDataset


class UniecgPtbxl(common.ECGBuilderBase):
    """PTB-XL 12-lead 10 s ECGs at 500 Hz with cardiologist reports and verbalised SCP codes, split
    by patient."""

    name = "uniecg_ptbxl"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download PTB-XL (https://physionet.org/content/ptb-xl/) and pass its root (holding "
        "ptbxl_database.csv, scp_statements.csv, records500/) as manual_dir.")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                     features=common.features(self.builder_config),
                                     homepage="https://physionet.org/content/ptb-xl/")

    def _split_generators(self, dl_manager):
        dataset = PTBXLDataset(dl_manager.manual_dir)
        keys = [(i, f"ptbxl_{dataset.rows[i].patient_id or i}") for i in dataset.ecg_ids()]
        return self._splits(keys, dataset.read)

    def _generate_examples(self, *args):  # splits come from `_splits` (common.generate)
        raise NotImplementedError
