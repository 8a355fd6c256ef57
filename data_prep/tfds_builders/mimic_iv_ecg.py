"""TFDS builder for MIMIC-IV-ECG (manual download: place the PhysioNet folder with record_list.csv,
machine_measurements.csv and files/ in manual_dir)."""
from __future__ import annotations

import tensorflow_datasets as tfds

from data_prep.tfds_builders import common
from uniecg_jax.data.readers.mimic import MimicDataset


class UniecgMimicIvEcg(common.ECGBuilderBase):
    """MIMIC-IV-ECG 12-lead 10 s ECGs with joined machine reports, split by patient (subject_id)."""

    name = "uniecg_mimic_iv_ecg"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download MIMIC-IV-ECG (https://physionet.org/content/mimic-iv-ecg/) and pass its root "
        "(holding record_list.csv, machine_measurements.csv, files/) as manual_dir.")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                     features=common.features(self.builder_config),
                                     homepage="https://physionet.org/content/mimic-iv-ecg/")

    def _split_generators(self, dl_manager):
        dataset = MimicDataset(dl_manager.manual_dir)
        keys = [(s, f"mimic_{dataset.patient_id(s)}") for s in dataset.study_ids()]
        return self._splits(keys, dataset.read)

    def _generate_examples(self, *args):  # splits come from `_splits` (common.generate)
        raise NotImplementedError
