"""ECG-Grounding-style conversations built from a record: a question and an evidence-based answer
whose every statement comes from the signal (QRS detection, QRS axis from leads I and aVF, limb-lead
voltage) or from the record's diagnoses. Used to train stage 1 on the bundled and synthetic records.
"""
from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from uniecg_jax.data.chat_format import INTERPRETATION_REQUEST, Turn
from uniecg_jax.data.measure import RhythmMeasurements, rhythm
from uniecg_jax.data.record import LEADS, ECGRecord

QUESTIONS = (
    INTERPRETATION_REQUEST,
    "What does this ECG show? Explain the features that support your answer.",
    "Please analyse this electrocardiogram: rhythm, rate, axis and diagnosis.",
    "Provide a feature-grounded interpretation of this ECG.",
)
FOLLOW_UP = ("Is the heart rate normal?",)


@dataclasses.dataclass(frozen=True)
class ECGFindings:
    """What can be measured from a [12, T] signal."""

    beats: int
    heart_rate_bpm: float
    mean_rr_ms: float
    rr_std_ms: float
    qrs_net_lead_i_mv: float
    qrs_net_avf_mv: float
    limb_peak_to_peak_mv: float

    @property
    def regular(self) -> bool:
        return self.rr_std_ms < 0.1 * self.mean_rr_ms

    @property
    def axis(self) -> str:
        positive_i, positive_avf = self.qrs_net_lead_i_mv > 0, self.qrs_net_avf_mv > 0
        if positive_i and positive_avf:
            return "normal"
        if positive_i:
            return "left axis deviation"
        if positive_avf:
            return "right axis deviation"
        return "extreme axis deviation"


def _net_qrs(lead: np.ndarray, peaks: np.ndarray, fs: float) -> float:
    """Median over beats of (max + min) in a +-60 ms window around the R peak, in mV."""
    half = int(0.06 * fs)
    values = [lead[max(0, p - half): p + half].max() + lead[max(0, p - half): p + half].min()
              for p in peaks.astype(int) if p - half >= 0 and p + half < len(lead)]
    return float(np.median(values)) if values else 0.0


def measure_findings(record: ECGRecord, rhythm_ii: RhythmMeasurements | None = None) -> ECGFindings:
    """Rate/rhythm from lead II, axis from leads I and aVF, voltage from the limb leads.
    `rhythm_ii`: `rhythm` of lead II when the caller has already measured it (data_prep)."""
    lead_ii = record.signal[LEADS.index("II")]
    rhythm_ii = rhythm_ii or rhythm(lead_ii, record.fs)
    peaks = rhythm_ii.r_peaks
    # Baseline-correct by the median so net deflection is not offset by wander.
    lead_i = record.signal[LEADS.index("I")] - np.median(record.signal[LEADS.index("I")])
    lead_avf = record.signal[LEADS.index("aVF")] - np.median(record.signal[LEADS.index("aVF")])
    limb_ptp = float(np.median(np.ptp(record.signal[:6], axis=1)))
    return ECGFindings(beats=len(peaks), heart_rate_bpm=rhythm_ii.heart_rate_bpm,
                       mean_rr_ms=rhythm_ii.mean_rr_ms, rr_std_ms=rhythm_ii.rr_std_ms,
                       qrs_net_lead_i_mv=_net_qrs(lead_i, peaks, record.fs),
                       qrs_net_avf_mv=_net_qrs(lead_avf, peaks, record.fs),
                       limb_peak_to_peak_mv=limb_ptp)


def evidence_answer(record: ECGRecord, findings: ECGFindings) -> str:
    """The answer text: rate/rhythm, axis and voltage evidence, then the diagnosis."""
    sentences = []
    if findings.beats >= 2:
        rate = findings.heart_rate_bpm
        speed = ("bradycardic" if rate < 60 else "tachycardic" if rate > 100 else
                 "within the normal range")
        sentences.append(
            f"Rhythm and rate: lead II shows {findings.beats} QRS complexes with a mean RR "
            f"interval of {findings.mean_rr_ms:.0f} ms (SD {findings.rr_std_ms:.0f} ms), "
            f"{'a regular' if findings.regular else 'an irregular'} rhythm at {rate:.0f} bpm, "
            f"{speed}.")
    else:
        sentences.append("Rhythm and rate: QRS complexes cannot be identified reliably in lead II.")
    sign = lambda v: "positive" if v > 0 else "negative"  # noqa: E731
    sentences.append(
        f"Axis: the net QRS deflection is {sign(findings.qrs_net_lead_i_mv)} in lead I "
        f"({findings.qrs_net_lead_i_mv:+.2f} mV) and {sign(findings.qrs_net_avf_mv)} in aVF "
        f"({findings.qrs_net_avf_mv:+.2f} mV), so the frontal QRS axis is {findings.axis}.")
    voltage = "low" if findings.limb_peak_to_peak_mv < 0.5 else "normal"
    sentences.append(f"Voltage: median limb-lead amplitude {findings.limb_peak_to_peak_mv:.2f} mV, "
                     f"{voltage} voltage.")
    diagnoses = ", ".join(record.labels) if record.labels else record.report
    if diagnoses:
        sentences.append(f"Diagnosis: {diagnoses}.".replace("..", "."))
    if record.report and record.report not in diagnoses:
        sentences.append(f"Report: {record.report}")
    return " ".join(sentences)


def build_conversation(record: ECGRecord, with_follow_up: bool = False,
                       rhythm_ii: RhythmMeasurements | None = None) -> list[Turn]:
    """[("user", question), ("assistant", answer), ...] for one record; the question is chosen
    deterministically from the record id. The ECG placeholder is added later by the pipeline."""
    findings = measure_findings(record, rhythm_ii)
    question = QUESTIONS[zlib.crc32(record.record_id.encode()) % len(QUESTIONS)]
    turns = [("user", question), ("assistant", evidence_answer(record, findings))]
    if with_follow_up and findings.beats >= 2:
        rate = findings.heart_rate_bpm
        verdict = ("No, it is below 60 bpm" if rate < 60 else "No, it is above 100 bpm"
                   if rate > 100 else "Yes, it is between 60 and 100 bpm")
        turns += [("user", FOLLOW_UP[0]), ("assistant", f"{verdict} ({rate:.0f} bpm).")]
    return turns
