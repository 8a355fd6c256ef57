"""ECG-Grounding-style conversations built from a record: a question and an evidence-based answer
whose every statement comes from the signal (QRS detection, QRS axis from leads I and aVF, limb-lead
voltage) or from the record's diagnoses. Used to train stage 1 on the bundled and synthetic records.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Sequence

import numpy as np

from uniecg_jax.data.chat_format import INTERPRETATION_REQUEST, InputBuilder, Turn
from uniecg_jax.data.measure import BRADYCARDIA_BELOW_BPM, TACHYCARDIA_ABOVE_BPM, \
    RhythmMeasurements, rhythm
from uniecg_jax.data.record import LEADS, ECGRecord
from uniecg_jax.errors import UniECGError

QUESTIONS = (
    INTERPRETATION_REQUEST,
    "What does this ECG show? Explain the features that support your answer.",
    "Please analyse this electrocardiogram: rhythm, rate, axis and diagnosis.",
    "Provide a feature-grounded interpretation of this ECG.",
)
FOLLOW_UP = ("Is the heart rate normal?",)
# Relative RMS of II - (I + III) above which the limb leads are not one heart's projections.
EINTHOVEN_TOLERANCE = 0.1


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
    qrs_net_lead_ii_mv: float
    # Einthoven's law II = I + III holds for recorded limb leads (to ~1% here); neurokit2's
    # synthetic "multileads" break it (residual ~90%), so no axis can be read from them.
    limb_leads_consistent: bool = True

    @property
    def regular(self) -> bool:
        return self.rr_std_ms < 0.1 * self.mean_rr_ms

    @property
    def axis(self) -> str:
        """The frontal QRS axis by the lead I / aVF quadrant; in the I+ aVF- quadrant (0 to -90
        degrees) lead II decides, as in the textbook three-lead method: positive in II means the
        axis is above -30 degrees, a normal (physiological left) axis, not left axis deviation."""
        positive_i, positive_avf = self.qrs_net_lead_i_mv > 0, self.qrs_net_avf_mv > 0
        if positive_i and (positive_avf or self.leftward_axis_is_normal):
            return "normal"
        if positive_i:
            return "left axis deviation"
        if positive_avf:
            return "right axis deviation"
        return "extreme axis deviation"

    @property
    def leftward_axis_is_normal(self) -> bool:
        """I+ aVF- with a positive net QRS in lead II: the axis lies between 0 and -30 degrees."""
        return self.qrs_net_lead_ii_mv > 0


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
    lead_ii_centred = lead_ii - np.median(lead_ii)
    limb_ptp = float(np.median(np.ptp(record.signal[:6], axis=1)))
    residual = lead_ii - record.signal[LEADS.index("I")] - record.signal[LEADS.index("III")]
    consistent = np.sqrt(np.mean(residual ** 2)) <= EINTHOVEN_TOLERANCE * np.sqrt(
        np.mean(lead_ii ** 2))
    return ECGFindings(beats=len(peaks), heart_rate_bpm=rhythm_ii.heart_rate_bpm,
                       mean_rr_ms=rhythm_ii.mean_rr_ms, rr_std_ms=rhythm_ii.rr_std_ms,
                       qrs_net_lead_i_mv=_net_qrs(lead_i, peaks, record.fs),
                       qrs_net_avf_mv=_net_qrs(lead_avf, peaks, record.fs),
                       limb_peak_to_peak_mv=limb_ptp,
                       qrs_net_lead_ii_mv=_net_qrs(lead_ii_centred, peaks, record.fs),
                       limb_leads_consistent=bool(consistent))


def evidence_answer(record: ECGRecord, findings: ECGFindings) -> str:
    """The answer text: rate/rhythm, axis and voltage evidence, then the diagnosis."""
    sentences = []
    if findings.beats >= 2:
        rate = findings.heart_rate_bpm
        speed = ("bradycardic" if rate < BRADYCARDIA_BELOW_BPM else "tachycardic"
                 if rate > TACHYCARDIA_ABOVE_BPM else "within the normal range")
        sentences.append(
            f"Rhythm and rate: lead II shows {findings.beats} QRS complexes with a mean RR "
            f"interval of {findings.mean_rr_ms:.0f} ms (SD {findings.rr_std_ms:.0f} ms), "
            f"{'a regular' if findings.regular else 'an irregular'} rhythm at {rate:.0f} bpm, "
            f"{speed}.")
    else:
        sentences.append("Rhythm and rate: QRS complexes cannot be identified reliably in lead II.")
    sign = lambda v: "positive" if v > 0 else "negative"  # noqa: E731
    if findings.limb_leads_consistent:
        lead_ii = ""
        if findings.qrs_net_lead_i_mv > 0 >= findings.qrs_net_avf_mv:   # lead II decides (`axis`)
            lead_ii = (f" and {sign(findings.qrs_net_lead_ii_mv)} in lead II "
                       f"({findings.qrs_net_lead_ii_mv:+.2f} mV)")
        sentences.append(
            f"Axis: the net QRS deflection is {sign(findings.qrs_net_lead_i_mv)} in lead I "
            f"({findings.qrs_net_lead_i_mv:+.2f} mV), {sign(findings.qrs_net_avf_mv)} in aVF "
            f"({findings.qrs_net_avf_mv:+.2f} mV){lead_ii}, so the frontal QRS axis is "
            f"{findings.axis}.")
    else:
        sentences.append("Axis: not assessed, the limb leads do not satisfy Einthoven's law "
                         "(II = I + III).")
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
        low, high = BRADYCARDIA_BELOW_BPM, TACHYCARDIA_ABOVE_BPM
        verdict = (f"No, it is below {low} bpm" if rate < low else f"No, it is above {high} bpm"
                   if rate > high else f"Yes, it is between {low} and {high} bpm")
        turns += [("user", FOLLOW_UP[0]), ("assistant", f"{verdict} ({rate:.0f} bpm).")]
    return turns


# ---------------------------------------------------------------------------------------------
# Stage 2: generation requests as users phrase them, and the requests answered without [ECG].
#
# `{report}` is the record's report, `{attrs}` the stated attributes (or ""). TRAINED_* phrasings
# are drawn in training; HELD_OUT_* never are (they measure generalisation to new wording).
TRAINED_REQUESTS = (
    # report style
    "Generate a 12-lead ECG that matches this report: {report}{attrs}",
    "Create an ECG with the following findings: {report}{attrs}",
    "Synthesize a 12-lead electrocardiogram showing {report}{attrs}",
    "Report: {report}{attrs}. Produce the matching ECG.",
    # question style
    "Can you generate an ECG showing {report}{attrs}?",
    "Could you draw a 12-lead ECG with {report}{attrs}?",
    "What would an ECG with {report} look like{attrs}? Please generate one.",
    # teaching objective
    "For teaching: generate an example ECG that illustrates {report}{attrs}.",
    "Learning objective: recognise {report}. Generate a corresponding ECG{attrs}.",
    "I am preparing a lecture on {report}. Show me a typical ECG{attrs}.",
)
HELD_OUT_REQUESTS = (
    "Please make an electrocardiogram consistent with: {report}{attrs}",
    "Show me what {report} looks like on a 12-lead ECG{attrs}.",
    "Students should learn to identify {report}; produce an illustrative tracing{attrs}.",
    "I need a sample ECG with {report}{attrs}, can you create one?",
)
# A follow-up request after a turn about the report (the report is only in that earlier turn).
TRAINED_FOLLOW_UPS = ("Generate an ECG that shows this{attrs}.",
                      "Now show me these findings as a 12-lead ECG{attrs}.")
HELD_OUT_FOLLOW_UPS = ("Can you draw that ECG for me{attrs}?",)
REPORT_QUESTIONS = (   # about a report, answered in words (trained)
    "What does this ECG report mean: {report}?",
    "Explain these ECG findings to a student: {report}",
    "Is this report worrying? {report}",
    "Should I be concerned about this finding: {report}?",
    "Summarise in plain words: {report}",
    "Which features on an ECG define {report}?",
    # A patient asking about their own result: with only the six above, seed 1 of the demo sent
    # the held-out "My ECG report says ..." question to [ECG] 66% of the time after 200 steps.
    "My doctor told me my ECG shows {report}. Is that serious?",
    "I was told I have {report}. What does that mean for me?",
    "The cardiologist wrote '{report}' on my results. Can you explain?",
)
HELD_OUT_REPORT_QUESTIONS = ("My ECG report says: {report}. What should I make of it?",)
REPORT_ANSWER = "The report describes {report}; rhythm and rate come from the RR intervals."
GENERAL_QUESTIONS = (  # (question, answer), trained
    ("Hello, who are you?", "I am an ECG assistant: I interpret 12-lead ECGs you attach and can "
     "generate an ECG from a description."),
    ("What is the normal duration of the PR interval?",
     "The normal PR interval is 120 to 200 ms."),
    ("What is a normal resting heart rate in adults?",
     "A normal resting heart rate in adults is 60 to 100 beats per minute."),
    ("How long is a normal QRS complex?", "A normal QRS complex lasts less than 120 ms."),
    ("Which leads look at the inferior wall of the heart?", "Leads II, III and aVF."),
    ("What does the T wave represent?", "The T wave represents ventricular repolarisation."),
    # Varied wording and topics (greetings, the assistant itself, ECG facts, questions that name a
    # finding or a rate without asking for an ECG): with only the six above, the [ECG] decision
    # (a linear read of the frozen LLM's state) learned those six strings, and 58% of held-out
    # general questions still got [ECG] after 400 demo steps.
    ("Good morning!", "Good morning. Attach a 12-lead ECG and I will interpret it, or describe "
     "the ECG you would like me to generate."),
    ("What can you do?", "I interpret 12-lead ECGs you attach and generate ECGs from a "
     "description."),
    ("Thank you.", "You are welcome."),
    ("Goodbye.", "Goodbye."),
    ("What is the P wave?", "The P wave represents atrial depolarisation."),
    ("What causes atrial fibrillation?", "Common causes are hypertension, heart failure, valve "
     "disease, ageing and an overactive thyroid."),
    ("How is the heart rate calculated from an ECG?", "Divide 60 by the RR interval in seconds, "
     "or 300 by the number of large squares between two R waves at 25 mm/s."),
    ("What is sinus tachycardia?", "Sinus rhythm faster than 100 beats per minute."),
    ("Is a heart rate of 55 bpm normal?", "At rest, 55 bpm is a mild sinus bradycardia, common "
     "and harmless in fit people."),
    ("What does ST elevation mean?", "ST elevation can mean acute myocardial infarction, "
     "pericarditis or early repolarisation."),
    ("How many leads does a standard ECG have?", "Twelve: six limb leads and six chest leads."),
    ("What paper speed is standard for an ECG?", "25 mm per second."),
    ("Can you explain what a bundle branch block is?", "A delay or block in one bundle branch, "
     "which widens the QRS complex to 120 ms or more."),
    ("What is the normal QRS axis?", "Between -30 and +90 degrees."),
    ("How do I prepare a patient for an ECG?", "Lay them supine, clean the skin and place the ten "
     "electrodes: four on the limbs, six on the chest."),
    ("What is the weather like today?", "I cannot check the weather; I interpret and generate "
     "ECGs."),
)
HELD_OUT_GENERAL_QUESTIONS = (
    ("What is the QT interval?", "The QT interval spans ventricular depolarisation and "
     "repolarisation, from the start of the QRS complex to the end of the T wave."),
    ("Thanks, that was helpful.", "You are welcome."),
)
# How each attribute is stated; `{hr}`, `{age}`, `{woman}` ("woman"/"man"), `{female}`
# ("female"/"male"), `{sex}` ("F"/"M"). Held-out forms are never trained either.
TRAINED_RATE_FORMS = (" at {hr} bpm", ", HR {hr}", ", heart rate {hr}",
                      " with a rate of {hr} beats per minute", ", rate {hr}/min")
HELD_OUT_RATE_FORMS = (", pulse {hr}", " beating at {hr} per minute")
TRAINED_PATIENT_FORMS = {   # keyed by what they state
    ("age", "sex"): (" in a {age}-year-old {woman}", ", {female}, {age} years",
                     " for a {age} y/o {sex} patient"),
    ("age",): (" in a patient aged {age}", ", age {age}"),
    ("sex",): (" in a {woman}", ", {female} patient"),
}
HELD_OUT_PATIENT_FORMS = {("age", "sex"): (" from a {female} aged {age}",),
                          ("age",): (", {age} years old",), ("sex",): (" of a {female}",)}
PHRASINGS = ("trained", "held_out")
# A generation request alone or after a turn about the report; a question about a report or a
# general question (both answered in words).
REQUEST_KINDS = ("request", "follow_up", "report_question", "general")


@dataclasses.dataclass(frozen=True)
class Stage2Request:
    """One stage-2 conversation: `turns` end with the user's last request (the answer comes from
    the caller: the `[ECG]` tokens when `is_generation`, else `answer`); `stated` is what the
    request text says of each attribute (None where it says nothing); `kind`: one of
    `REQUEST_KINDS` (what the evaluation breaks its scores down by); `template`: the unformatted
    wording of the last user turn (the evaluation's [ECG] share per wording)."""
    turns: tuple[Turn, ...]
    is_generation: bool
    answer: str | None = None
    stated: tuple[tuple[str, float | str | None], ...] = ()
    kind: str = "request"
    template: str = ""


def record_attributes(record: ECGRecord) -> dict:
    """The record's own scalar conditions (what the diffusion model is conditioned on): heart rate
    (bpm; MIMIC-IV-ECG: machine `rr_interval`, else the QRS-measured `qrs_heart_rate`), age
    (years) and sex ("M"/"F"); None where unknown."""
    rate = record.heart_rate or record.measurements.get("qrs_heart_rate")
    return {"heart_rate": None if rate is None else float(rate),
            "age": None if record.age is None else float(record.age),
            "sex": record.sex if record.sex in ("M", "F") else None}


def _phrasing_set(phrasing: str, trained, held_out):
    if phrasing not in PHRASINGS:
        raise ValueError(f"phrasing must be one of {PHRASINGS}, got {phrasing!r}")
    return trained if phrasing == "trained" else held_out


def _stated_attributes(attributes: dict, rng: np.random.Generator, phrasing: str,
                       state_probability: float) -> tuple[str, dict]:
    """(the attribute phrase, {name: stated value or None}): each known attribute is stated with
    `state_probability`, in a form drawn from the phrasing set."""
    stated = {name: value for name, value in attributes.items()
              if value is not None and rng.random() < state_probability}
    phrase = ""
    patient = tuple(name for name in ("age", "sex") if name in stated)
    if patient:
        forms = _phrasing_set(phrasing, TRAINED_PATIENT_FORMS, HELD_OUT_PATIENT_FORMS)[patient]
        female = stated.get("sex") == "F"
        phrase += forms[rng.integers(len(forms))].format(
            age=int(round(stated.get("age", 0))), woman="woman" if female else "man",
            female="female" if female else "male", sex=stated.get("sex", ""))
    if "heart_rate" in stated:
        stated["heart_rate"] = float(round(stated["heart_rate"]))
        forms = _phrasing_set(phrasing, TRAINED_RATE_FORMS, HELD_OUT_RATE_FORMS)
        phrase += forms[rng.integers(len(forms))].format(hr=int(stated["heart_rate"]))
    if "age" in stated:
        stated["age"] = float(round(stated["age"]))
    return phrase, {name: stated.get(name) for name in ("heart_rate", "age", "sex")}


def _clean_report(report: str) -> str:
    return report.strip().rstrip(".") or "a normal ECG"


def generation_request(report: str, attributes: dict, rng: np.random.Generator, *,
                       phrasing: str = "trained", state_probability: float = 0.5,
                       follow_up_probability: float = 0.0) -> Stage2Request:
    """A request for an ECG matching `report`, in a drawn template (report-, question- or
    teaching-style), stating each known attribute of `attributes` (`record_attributes`) with
    `state_probability`; with `follow_up_probability` it is a follow-up after a question about the
    report and its answer (one conversation)."""
    report = _clean_report(report)
    phrase, stated = _stated_attributes(attributes, rng, phrasing, state_probability)
    if rng.random() < follow_up_probability:
        questions = _phrasing_set(phrasing, REPORT_QUESTIONS, HELD_OUT_REPORT_QUESTIONS)
        follow_ups = _phrasing_set(phrasing, TRAINED_FOLLOW_UPS, HELD_OUT_FOLLOW_UPS)
        question = questions[rng.integers(len(questions))]   # drawn first, then the follow-up
        follow_up = follow_ups[rng.integers(len(follow_ups))]
        turns = (("user", question.format(report=report)),
                 ("assistant", REPORT_ANSWER.format(report=report)),
                 ("user", follow_up.format(attrs=phrase)))
        return Stage2Request(turns, True, stated=tuple(stated.items()), kind="follow_up",
                             template=follow_up)
    templates = _phrasing_set(phrasing, TRAINED_REQUESTS, HELD_OUT_REQUESTS)
    template = templates[rng.integers(len(templates))]
    turns = (("user", template.format(report=report, attrs=phrase)),)
    return Stage2Request(turns, True, stated=tuple(stated.items()), template=template)


def text_answered_request(report: str, rng: np.random.Generator, *,
                          phrasing: str = "trained") -> Stage2Request:
    """A request answered in words, never with `[ECG]`: a question about `report` or a general
    question (half each), drawn from the phrasing set."""
    if rng.random() < 0.5:
        questions = _phrasing_set(phrasing, REPORT_QUESTIONS, HELD_OUT_REPORT_QUESTIONS)
        report = _clean_report(report)
        question = questions[rng.integers(len(questions))]
        return Stage2Request((("user", question.format(report=report)),), False,
                             REPORT_ANSWER.format(report=report), kind="report_question",
                             template=question)
    pairs = _phrasing_set(phrasing, GENERAL_QUESTIONS, HELD_OUT_GENERAL_QUESTIONS)
    question, answer = pairs[rng.integers(len(pairs))]
    return Stage2Request((("user", question),), False, answer, kind="general", template=question)


def stage2_request(report: str, attributes: dict, rng: np.random.Generator, *,
                   negative_probability: float, follow_up_probability: float,
                   state_probability: float = 0.5, phrasing: str = "trained") -> Stage2Request:
    """One stage-2 training conversation for a record: with `negative_probability` a request
    answered in words (`text_answered_request`), else a generation request
    (`generation_request`)."""
    if rng.random() < negative_probability:
        return text_answered_request(report, rng, phrasing=phrasing)
    return generation_request(report, attributes, rng, phrasing=phrasing,
                              state_probability=state_probability,
                              follow_up_probability=follow_up_probability)


def request_prompt_ids(inputs: InputBuilder, turns: Sequence[Turn]) -> list[int]:
    """Text-only conversation ending with a user request, followed by the whole assistant prefix:
    for one user turn exactly `InputBuilder.request_ids`; earlier turns as `conversation` writes
    them. What a stage-2 example holds before its answer, and what serving feeds."""
    ids, _ = inputs.conversation(list(turns), with_ecg=False)
    return ids + _assistant_prefix_ids(inputs)


def _assistant_prefix_ids(inputs: InputBuilder) -> list[int]:
    return inputs.tokenizer.encode(inputs.template.assistant_prefix, add_special_tokens=False)


def stage2_fields(inputs: InputBuilder, request: Stage2Request, ecg_token_ids: Sequence[int],
                  max_length: int) -> dict:
    """Training fields of one stage-2 conversation: the request answered by the `[ECG]` tokens and
    `</s>` (generation) or by its text answer and `</s>`; the loss mask covers every assistant
    answer (earlier turns' too). A generation prompt too long for `max_length` loses the tokens
    just before its last third (the end, with the stated attributes, stays; less of it when the
    cut is longer than the rest; the opening role prefix always stays), so the `[ECG]` tokens
    always fit; a text answer is cut at the end.
    Returns input_ids / loss_mask / attention_mask [max_length] i32, ecg_token_positions [N] i32
    (zeros for a text answer) and is_generation (bool)."""
    ids, mask = inputs.conversation(list(request.turns), with_ecg=False)
    tail = _assistant_prefix_ids(inputs)
    if request.is_generation:
        answer = list(ecg_token_ids) + [inputs.tokenizer.eos_token_id]
        overflow = len(ids) + len(tail) + len(answer) - max_length
        if overflow > 0:
            # Cut before the last third, not at the end: a request ends with the attributes it
            # states ("... at 130 bpm in a 70-year-old woman"), which the attribute head is
            # trained to read; cutting the end lost the stated rate in 16% of the demo's
            # rate-stating requests (max_length 128), leaving a target the text no longer held.
            # "<s>USER: " and the request's first token stay (the +1 below)
            head = len(inputs.conversation([("user", "")], with_ecg=False)[0])
            if overflow >= len(ids) - head - 1:
                raise UniECGError(f"max_length={max_length} cannot hold the request and "
                                  f"{len(ecg_token_ids)} [ECG] tokens")
            keep = min((len(ids) - head) // 3, len(ids) - head - 1 - overflow)
            cut = len(ids) - keep - overflow
            ids, mask = ids[:cut] + ids[cut + overflow:], mask[:cut] + mask[cut + overflow:]
    else:
        answer = inputs.tokenizer.encode(request.answer.strip(), add_special_tokens=False) + [
            inputs.tokenizer.eos_token_id]
    start = len(ids) + len(tail)
    input_ids, loss_mask, attention = inputs.fixed_length(
        ids + tail + answer, mask + [0] * len(tail) + [1] * len(answer), max_length)
    positions = (np.arange(start, start + len(ecg_token_ids), dtype=np.int32)
                 if request.is_generation else np.zeros((len(ecg_token_ids),), np.int32))
    return dict(input_ids=input_ids, loss_mask=loss_mask, attention_mask=attention,
                ecg_token_positions=positions, is_generation=bool(request.is_generation))
