"""Evaluation: judge-free interpretation metrics (report_metrics), the GEM-style judge scorer (judge)
and generated-ECG fidelity metrics (ecg_fidelity)."""
