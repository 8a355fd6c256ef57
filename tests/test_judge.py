"""GEM-style judge: request building, answer parsing and aggregation, against a local HTTP server
(no real endpoint is ever called)."""
import http.server
import json
import os
import threading

import pytest

from uniecg_jax.eval import judge as J

GOOD_ANSWER = {
    "DiagnosisAccuracy": [{"Score": 2, "Explanation": "AF correct"},
                          {"Score": 0, "Explanation": "LBBB wrong"}],
    "AnalysisCompleteness": [{"Score": 1, "Explanation": "rhythm"}, {"Score": 1, "Explanation": "QRS"},
                             {"Score": 0, "Explanation": "QT missing"}],
    "AnalysisRelevance": [{"Score": 2, "Explanation": "x"}, {"Score": 1, "Explanation": "y"}],
    "LeadAssessmentCoverage": [{"Score": 1, "Explanation": f"lead {i}"} for i in range(9)],
    "LeadAssessmentAccuracy": [{"Score": 2, "Explanation": "ok"}] * 6,
    "ECGFeatureGrounding": [{"Score": 80, "Explanation": "cited"}],
    "EvidenceBasedReasoning": [{"Score": 50, "Explanation": "partial"}],
    "ClinicalDiagnosticFidelity": [{"Score": 80, "Explanation": "structured"}],
}
EXPECTED_SCORES = {
    "DiagnosisAccuracy": 50.0, "AnalysisCompleteness": 2.0, "AnalysisRelevance": 3.0,
    "LeadAssessmentCoverage": 75.0, "LeadAssessmentAccuracy": 50.0, "ECGFeatureGrounding": 80.0,
    "EvidenceBasedReasoning": 50.0, "ClinicalDiagnosticFidelity": 80.0, "average": 70.0,
}


class _Server:
    """A one-thread OpenAI-compatible stub; `responses` is a queue of (status, body)."""

    def __init__(self):
        self.requests, self.responses = [], []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((self.path, dict(self.headers), json.loads(body)))
                status, payload = outer.responses.pop(0)
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_port}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def _chat(content):
    return {"choices": [{"message": {"role": "assistant", "content": content}}]}


def test_request_and_scores_through_local_server(server):
    config = J.JudgeConfig(model="judge-x", base_url=server.base_url + "/", api_key_env="JUDGE_KEY",
                           max_retries=0)
    server.responses.append((200, _chat("```json\n" + json.dumps(GOOD_ANSWER) + "\n```")))
    result = J.judge_report("Atrial fibrillation, LBBB.", "Atrial fibrillation.", config,
                            environ={"JUDGE_KEY": "sk-test"})
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "judge-x" and body["temperature"] == 0.0
    prompt = body["messages"][0]["content"]
    assert body["messages"][0]["role"] == "user"
    assert "GENERATED interpretation:\nAtrial fibrillation, LBBB." in prompt
    assert "REFERENCE interpretation:\nAtrial fibrillation." in prompt
    assert all(metric in prompt for metric in J.METRICS)
    assert result["scores"] == pytest.approx(EXPECTED_SCORES)
    assert result["judge_model"] == "judge-x"
    summary = J.aggregate_judge_scores([result, {"scores": {**EXPECTED_SCORES, "average": 30.0}}],
                                       "judge-x")
    assert summary["average"] == 50.0 and summary["DiagnosisAccuracy"] == 50.0
    assert summary["judge_model"] == "judge-x" and summary["num_records"] == 2


def test_retries_server_errors_then_fails_clearly(server):
    config = J.JudgeConfig(base_url=server.base_url, api_key_env="", max_retries=1)
    server.responses += [(503, "busy"), (200, _chat(json.dumps(GOOD_ANSWER)))]
    sleeps = []
    raw = J.call_judge(config, "prompt", sleep=sleeps.append)
    assert json.loads(raw) == GOOD_ANSWER and sleeps == [1.0]
    assert "Authorization" not in server.requests[0][1]
    server.responses += [(400, '{"error": "bad model"}')]
    with pytest.raises(J.JudgeError, match=r"127\.0\.0\.1.*/chat/completions answered HTTP 400.*"
                                           r"bad model"):
        J.call_judge(config, "prompt", sleep=sleeps.append)
    server.responses += [(200, {"unexpected": True})]
    with pytest.raises(J.JudgeError, match=r"no choices\[0\]\.message\.content"):
        J.call_judge(config, "prompt", sleep=sleeps.append)


def test_missing_api_key_is_named():
    with pytest.raises(J.JudgeError, match="'MY_JUDGE_KEY' is not set"):
        J.build_request(J.JudgeConfig(api_key_env="MY_JUDGE_KEY"), "p", environ={})


def test_parse_messy_answers():
    messy = ("Here is my evaluation:\n{'DiagnosisAccuracy': [{'Score': +2, 'Explanation': 'ok'},],\n"
             "'AnalysisCompleteness': [{'Score': 1, 'Explanation': 'a'}],\n"
             "'AnalysisRelevance': [{'Score': '2 points', 'Explanation': 'b'}],\n"
             "'LeadAssessmentCoverage': [{'Score': 1}] ,\n"
             "'LeadAssessmentAccuracy': [{'Score': 2}],\n"
             "'GroundedECGUnderstanding': [{'Score': 100, 'Explanation': 'c'}],\n"
             "'EvidenceBasedReasoning': 80,\n"
             "'RealisticDiagnosticProcess': [{'Score': 50}]}\nThanks!")
    items = J.parse_judge_response(messy)
    assert items["DiagnosisAccuracy"] == [2.0] and items["AnalysisRelevance"] == [2.0]
    assert items["ECGFeatureGrounding"] == [100.0] and items["EvidenceBasedReasoning"] == [80.0]
    assert items["ClinicalDiagnosticFidelity"] == [50.0]
    assert J.record_scores(items)["average"] == pytest.approx(230 / 3)
    trailing = json.dumps(GOOD_ANSWER).replace("}]", "},]")
    assert J.parse_judge_response(trailing)["LeadAssessmentCoverage"] == [1.0] * 9


def test_record_score_caps():
    items = {m: [0.0] for m in J.METRICS}
    items.update(LeadAssessmentCoverage=[1.0] * 14, LeadAssessmentAccuracy=[2.0] * 14,
                 ECGFeatureGrounding=[150.0], DiagnosisAccuracy=[])
    scores = J.record_scores(items)
    assert scores["LeadAssessmentCoverage"] == 100.0 and scores["LeadAssessmentAccuracy"] == 100.0
    assert scores["ECGFeatureGrounding"] == 100.0 and scores["DiagnosisAccuracy"] == 0.0


@pytest.mark.parametrize("answer, message", [
    ("I cannot grade this.", "holds no JSON object"),
    ('{"DiagnosisAccuracy": [}', "not valid JSON"),
    (json.dumps({k: v for k, v in GOOD_ANSWER.items() if k != "AnalysisRelevance"}),
     r"lacks criteria \['AnalysisRelevance'\]"),
    (json.dumps({**GOOD_ANSWER, "EvidenceBasedReasoning": [{"Explanation": "no score"}]}),
     "an item of EvidenceBasedReasoning has no Score"),
])
def test_parse_errors_are_clear(answer, message):
    with pytest.raises(J.JudgeError, match=message):
        J.parse_judge_response(answer)


def test_config_from_configdict():
    import ml_collections
    cfg = ml_collections.ConfigDict(dict(model="m", base_url="http://x/v1", api_key_env="",
                                         temperature=0.2, timeout_s=5.0, max_retries=0))
    assert J.JudgeConfig.from_config(cfg) == J.JudgeConfig("m", "http://x/v1", "", 0.2, 5.0, 0)


def test_eval_results_are_judged_resumably(tmp_path):
    """`uniecg eval interpret --judge` path: every merged row judged once, a rerun asks nothing."""
    from uniecg_jax.eval import interpret_eval

    out = tmp_path / "results.jsonl"
    rows = [{"record_id": f"r{i}", "generated": "Sinus rhythm.", "reference": "",
             "reference_labels": ["sinus rhythm"]} for i in range(2)]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    server = _Server()
    try:
        answer = {"choices": [{"message": {"content": json.dumps(GOOD_ANSWER)}}]}
        server.responses = [(200, answer), (200, answer)]
        config = J.JudgeConfig(model="judge-stub", base_url=server.base_url, api_key_env="X_KEY")
        os.environ["X_KEY"] = "secret"
        summary = interpret_eval.judge_results(str(out), config, progress=False)
        assert len(server.requests) == 2
        assert summary["num_records"] == 2 and summary["judge_model"] == "judge-stub"
        assert summary["average"] == pytest.approx(EXPECTED_SCORES["average"])
        again = interpret_eval.judge_results(str(out), config, progress=False)
        assert len(server.requests) == 2 and again == summary
    finally:
        server.close()
        os.environ.pop("X_KEY", None)
