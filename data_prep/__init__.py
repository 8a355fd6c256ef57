"""Dataset preparation: source datasets -> ArrayRecord shards split by patient (`uniecg prep`), and
TFDS builders for MIMIC-IV-ECG and PTB-XL (`data_prep.tfds_builders`)."""
