"""Judge-free interpretation metrics: hand-checked examples with exact expected values."""
import pytest

from uniecg_jax.eval.report_metrics import (LEADS, Reference, StatementVocabulary, baseline_reports,
                                            evaluate_reports, extract_leads, extract_measurements,
                                            extract_statements, score_record)


@pytest.fixture(scope="module")
def vocab():
    return StatementVocabulary.default()


def test_vocabulary_merges_sources_and_synonyms(vocab):
    # Challenge SNOMED code, PTB-XL SCP code, abbreviation and free text meet in one statement.
    assert vocab.lookup("164889003") == vocab.lookup("AFIB") == vocab.lookup("AF") \
        == vocab.lookup("atrial fibrillation") == "atrial fibrillation"
    assert vocab.lookup("left atrial abnormality") == vocab.lookup("LAO/LAE") \
        == "left atrial enlargement"
    assert vocab.lookup("CRBBB") == vocab.lookup("right bundle branch block")
    assert vocab.lookup("1st degree av block") == vocab.lookup("1AVB") == "first degree av block"
    assert vocab.lookup("PVC") == vocab.lookup("VPB")  # Challenge equivalence class
    assert vocab.lookup("made-up finding") is None


def test_statements_longest_match_abbreviations_and_negation(vocab):
    found = extract_statements(
        "Sinus tachycardia with first-degree AV block. No evidence of atrial fibrillation or "
        "flutter. LBBB. Inverted T-waves in V5, no ST depression, left axis deviation.", vocab)
    assert found.present == {"sinus tachycardia", "first degree av block",
                             "left bundle branch block", "t wave inversion", "left axis deviation"}
    assert found.negated == {"atrial fibrillation", "st depression"}


@pytest.mark.parametrize("text, present, negated", [
    ("no ST elevation, sinus rhythm", {"sinus rhythm"}, {"st elevation"}),
    ("without atrial fibrillation, ischemia or LVH", set(),
     {"atrial fibrillation", "left ventricular hypertrophy"}),
    ("atrial fibrillation is absent, but sinus bradycardia is present",
     {"sinus bradycardia"}, {"atrial fibrillation"}),
    ("Not atrial flutter; atrial flutter ruled out", set(), {"atrial flutter"}),
    ("no AF. AF later in the strip", {"atrial fibrillation"}, set()),  # asserted wins
    # "Otherwise normal ECG" qualifies: the ECG is abnormal, so it is not the NORM statement.
    ("sinus bradycardia. heart rate 55 bpm. otherwise normal ecg.", {"sinus bradycardia"}, set()),
    ("Sinus tachycardia, otherwise normal ECG", {"sinus tachycardia"}, set()),
    ("sinus rhythm. normal ECG.", {"sinus rhythm", "normal ecg"}, set()),
])
def test_negation(vocab, text, present, negated):
    found = extract_statements(text, vocab)
    assert found.present == present and found.negated == negated


def test_measurements():
    text = ("Heart rate 72 bpm. PR interval 0.16 s, QRS duration of 98 ms, QT/QTc 380/420 ms. "
            "QRS axis 60 degrees.")
    assert extract_measurements(text) == {"heart_rate": 72.0, "pr": 160.0, "qrs": 98.0,
                                          "qt": 380.0, "qtc": 420.0}
    assert extract_measurements("Ventricular rate is 110 beats per minute; QRS axis +60 degrees; "
                                "QTc interval of 0.47 seconds; QT 400") == \
        {"heart_rate": 110.0, "qtc": 470.0, "qt": 400.0}
    assert extract_measurements("The rhythm is regular at 58 bpm, QRS complexes are narrow") == \
        {"heart_rate": 58.0}
    assert extract_measurements("PR segment depression. No numbers here.") == {}


def test_lead_parsing():
    assert extract_leads("ST elevation in V1-V3 and leads II, III and aVF") == \
        {"V1", "V2", "V3", "II", "III", "aVF"}
    assert extract_leads("T inversion in V2 to V5 and AVL") == {"V2", "V3", "V4", "V5", "aVL"}
    assert extract_leads("lead I is normal; Mobitz type II block") == {"I"}
    assert extract_leads("Q waves in the inferior leads") == {"II", "III", "aVF"}
    assert extract_leads("Q waves in the inferior leads", expand_groups=False) == set()
    assert extract_leads("all 12 leads reviewed") == set(LEADS)
    assert extract_leads("I think II is a number") == set()


def test_score_and_aggregate_hand_checked(vocab):
    generated = [
        "Sinus rhythm, left axis deviation. Heart rate 70 bpm. QRS 100 ms. ST changes in V1-V3.",
        "Atrial fibrillation. No left bundle branch block. Rate 130 bpm in leads I, aVL.",
        "Normal ECG.",
    ]
    references = [
        Reference(text="sinus rhythm, left axis deviation, prolonged qt interval",
                  measurements={"heart_rate": 75.0, "qrs": 90.0}),
        Reference(labels=["164889003", "164909002"], measurements={"heart_rate": 120.0}),
        Reference(text="sinus bradycardia. Heart rate 50 bpm. ST elevation in V2, V3."),
    ]
    record = score_record(generated[1], references[1], vocab)
    assert record["predicted_statements"] == ["atrial fibrillation"]
    assert record["reference_statements"] == ["atrial fibrillation", "left bundle branch block"]
    assert (record["tp"], record["fp"], record["fn"]) == (1, 0, 1)

    m = evaluate_reports(generated, references, vocab)
    # Record TP/FP/FN: (2, 0, 1), (1, 0, 1), (0, 1, 2) -> micro P = 3/4, R = 3/7, F1 = 6/11.
    micro = m["diagnosis"]["micro"]
    assert (micro["tp"], micro["fp"], micro["fn"]) == (3, 1, 4)
    assert micro["precision"] == pytest.approx(0.75) and micro["recall"] == pytest.approx(3 / 7)
    assert micro["f1"] == pytest.approx(6 / 11)
    # Per statement: SR, LAD, AF perfect (F1 1); LQT, LBBB, SB, STE missed (0); normal ECG FP (0).
    assert m["diagnosis"]["macro"]["num_statements"] == 8
    assert m["diagnosis"]["macro"]["f1"] == pytest.approx(3 / 8)
    assert m["diagnosis"]["macro"]["precision"] == pytest.approx(3 / 8)
    # Per record F1: 0.8, 2/3, 0.
    assert m["diagnosis"]["per_record"]["f1"] == pytest.approx((0.8 + 2 / 3 + 0) / 3)
    hr = m["measurements"]["heart_rate"]
    assert hr["count"] == 2 and hr["mae"] == pytest.approx((5 + 10) / 2)
    assert hr["stated_fraction"] == pytest.approx(2 / 3)
    assert m["measurements"]["qrs"] == {"unit": "ms", "mae": 10.0, "count": 1,
                                        "stated_fraction": 1.0}
    assert m["measurements"]["pr"]["mae"] is None and m["measurements"]["pr"]["count"] == 0
    # Leads: 3/12, 2/12, 0 -> mean 5/36; only record 3's reference names leads (V2, V3) and its
    # generated text names none -> recall 0.
    assert m["leads"]["coverage"] == pytest.approx((3 + 2 + 0) / 36)
    assert m["leads"]["reference_recall_micro"] == 0.0


def test_baselines(vocab):
    references = [
        Reference(text="sinus rhythm. Heart rate 60 bpm"),
        Reference(text="Normal sinus rhythm. Heart rate 80 bpm"),
        Reference(text="Sinus tachycardia, heart rate 130 bpm, QRS 100 ms"),
    ]
    baseline = baseline_reports(references, vocab)
    assert baseline == ["sinus rhythm. Heart rate 90 bpm. QRS duration 100 ms."] * 3
    m = evaluate_reports(baseline, references, vocab)
    # Statements: SR right twice; record 3: FP SR, FN sinus tachycardia -> micro P = R = 2/3.
    assert m["diagnosis"]["micro"]["precision"] == pytest.approx(2 / 3)
    assert m["diagnosis"]["micro"]["recall"] == pytest.approx(2 / 3)
    assert m["measurements"]["heart_rate"]["mae"] == pytest.approx((30 + 10 + 40) / 3)
    assert m["measurements"]["qrs"]["mae"] == 0.0
    assert m["leads"]["coverage"] == 0.0


def test_bad_inputs(vocab):
    with pytest.raises(ValueError, match="2 generated reports vs 1 references"):
        evaluate_reports(["a", "b"], ["c"], vocab)
    with pytest.raises(ValueError, match="reference label 'XYZ123' is not in the statement"):
        evaluate_reports(["a"], [Reference(labels=["XYZ123"])], vocab)
