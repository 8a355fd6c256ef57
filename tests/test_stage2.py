"""Stage 2 and the unified model: [ECG] vocabulary extension, gather, frozen rows, preservation,
the [ECG] decision over varied phrasings, the attribute head (heart rate / age / sex read from the
request), chat generation to WFDB, whole-model HF export, kill-and-resume."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_equal

from uniecg_jax.config import ConfigError, load_config
from uniecg_jax.inference.interpret import Interpreter
from uniecg_jax.models.alignment import gather_ecg_hidden
from uniecg_jax.convert.hf_llm import add_tokens
from uniecg_jax.data.chat_format import ecg_token_names
from uniecg_jax.models.stage2 import build_stage2, init_stage2_params
from uniecg_jax.train import build_task
from uniecg_jax.train.loop import train
from uniecg_jax.inference.chat import UnifiedModel, parse_conditions
from uniecg_jax.data.conversations import (TRAINED_REQUESTS, generation_request, stage2_fields,
                                           stage2_request)

STAGE1 = ["data.max_length=48", "data.num_synthetic=0", "model.llm.num_layers=1",
          "model.ecg_encoder.layers=1"]
TEXT_DIM = 32
STAGE2 = [f"text.encoder=hash:{TEXT_DIM}", f"text.embed_dim={TEXT_DIM}", "data.num_synthetic=8",
          "model.num_ecg_tokens=4", "data.max_length=96", "data.interpret_max_length=48",
          "train.steps=24", "train.log_every=8", "train.checkpoint_every=0",
          "train.learning_rate=2e-2", "train.warmup_steps=2"]
REQUEST = ("Generate a 12-lead ECG that matches this report: Sinus rhythm. Normal ECG. "
           "A 60-year-old woman, HR 110.")


def _stage2_config(extra=()):
    return load_config("configs/stage2.py:tiny", STAGE2 + list(extra))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A stage-1 model (random, lm_head scaled so its greedy answers are decided by clear margins,
    as a trained model's are) and a stage-2 run on it; both exported."""
    root = tmp_path_factory.mktemp("unified")
    stage1_config = load_config("configs/stage1.py:tiny", STAGE1)
    stage1_task = build_task(stage1_config)
    params = jax.jit(lambda rng: nn.meta.unbox(stage1_task.init_params(rng)))(
        jax.random.PRNGKey(0))
    params = jax.device_get(params)
    params["llm"]["lm_head"]["kernel"] = params["llm"]["lm_head"]["kernel"] * 10.0
    stage1_dir = str(root / "stage1")
    stage1_task.export(stage1_dir, params)

    # 40 steps: the decision read-out (`model.decision`) starts from scratch; at 24 one trained
    # question-style request ("Can you generate an ECG showing ...?") was still answered in words.
    config = _stage2_config([f"init.stage1_ckpt={stage1_dir}", "train.steps=40"])
    task = build_task(config)
    config = task.config
    result = train(config, str(root / "stage2"), task)
    final = jax.device_get(result.state.params)
    task.export(str(root / "stage2"), final)
    return dict(stage1_dir=stage1_dir, stage1_params=params, stage2_dir=str(root / "stage2"),
                config=config, params=final, history=result.history, root=root)


@pytest.fixture(scope="module")
def tiny_diffusion():
    """An untrained tiny diffusion model conditioned on TEXT_DIM-d embeddings."""
    from uniecg_jax.layers.params import init_params_on_host
    from uniecg_jax.diffusion.pipeline import DiffusionPipeline
    from uniecg_jax.models.unet import ConditionalUNet, UNetConfig
    from uniecg_jax.models.vae import VAE, VAEConfig

    config = load_config("configs/diffusion.py:tiny", [f"text.embed_dim={TEXT_DIM}"])
    unet = ConditionalUNet(UNetConfig.from_config(config.model.unet, config.diffusion.num_steps))
    vae = VAE(VAEConfig.from_config(config.model.vae))
    unet_params = init_params_on_host(unet, 0, jnp.zeros((1, 128, 4)), jnp.zeros((1,), jnp.int32),
                                      jnp.zeros((1, TEXT_DIM + 3)))
    vae_params = init_params_on_host(vae, 1, jnp.zeros((1, 1024, 12)))
    return DiffusionPipeline.from_config(config, vae_params, unet_params), config


def test_gathered_ecg_hidden_states_equal_a_manual_gather():
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((3, 10, 6)).astype(np.float32)
    ecg_ids = (20, 21, 22)
    ids = rng.integers(3, 19, (3, 10))
    ids[0, [4, 5, 6]] = ecg_ids
    ids[1, [1, 7, 9]] = ecg_ids          # scattered: still in sequence order
    ids[2, [8, 9]] = ecg_ids[:2]         # only two of the three
    gathered, valid = jax.jit(gather_ecg_hidden, static_argnums=2)(hidden, ids, ecg_ids)
    np.testing.assert_array_equal(gathered[0], hidden[0, [4, 5, 6]])
    np.testing.assert_array_equal(gathered[1], hidden[1, [1, 7, 9]])
    np.testing.assert_array_equal(gathered[2, :2], hidden[2, [8, 9]])
    np.testing.assert_array_equal(gathered[2, 2], 0.0)
    np.testing.assert_array_equal(valid, [[1, 1, 1], [1, 1, 1], [1, 1, 0]])


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_alignment_head_kinds_have_named_params_and_ignore_missing_slots(kind):
    config = _stage2_config([f"model.alignment.kind={kind}", "model.alignment.hidden_dim=16"])
    config = build_task(config).config  # the finalised config: ecg_token_ids / vocab filled
    model, cfg = build_stage2(config.model)
    boxed = init_stage2_params(model, jax.random.PRNGKey(0))
    for leaf in jax.tree.leaves(boxed["alignment"], is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        assert isinstance(leaf, nn.Partitioned), "alignment params need logical axis names"
    params = nn.meta.unbox(boxed)
    ids = np.full((2, 12), 7)
    ids[:, 3:3 + cfg.num_ecg_tokens] = cfg.ecg_token_ids
    _, condition, valid = model.apply({"params": params}, ids)
    assert condition.shape == (2, TEXT_DIM) and bool(valid.all())
    # A padding slot (token not emitted) must not change the pooled output of the rest.
    hidden = jax.random.normal(jax.random.PRNGKey(1), (1, cfg.num_ecg_tokens, 64))
    head = lambda h, v: model.apply({"params": params}, h, v,  # noqa: E731
                                    method=lambda m, h, v: m.alignment(h, v))
    partial = jnp.arange(cfg.num_ecg_tokens)[None] < 2
    np.testing.assert_allclose(head(hidden, partial),
                               head(hidden.at[:, 2:].set(99.0), partial), atol=1e-5)


def test_vocabulary_extension_adds_mean_rows():
    from uniecg_jax.data.tokenizer import load_tiny

    tokenizer = load_tiny()
    rng = np.random.default_rng(0)
    llm = {"embedding": rng.standard_normal((512, 8)).astype(np.float32),
           "lm_head": {"kernel": rng.standard_normal((8, 512)).astype(np.float32)}}
    cfg = load_config("configs/llm.py:tiny").model
    grown, grown_cfg, ids = add_tokens(llm, cfg, tokenizer, ecg_token_names(3))
    assert ids == [512, 513, 514] and grown_cfg.vocab_size == 515 == len(tokenizer)
    np.testing.assert_allclose(grown["embedding"][512:], np.repeat(
        llm["embedding"].mean(0, keepdims=True), 3, 0), rtol=1e-6)
    np.testing.assert_allclose(grown["lm_head"]["kernel"][:, 514], llm["lm_head"]["kernel"].mean(1),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(grown["embedding"][:512], llm["embedding"])
    # Tokens the tokenizer already has keep their (trained) rows: a second call changes nothing.
    trained = dict(grown, embedding=np.asarray(grown["embedding"]).copy())
    trained["embedding"][512:] = 7.0
    again, _, same_ids = add_tokens(trained, grown_cfg, tokenizer, ecg_token_names(3))
    assert same_ids == ids and again["embedding"].shape == (515, 8)
    np.testing.assert_array_equal(again["embedding"], trained["embedding"])
    # A token added inside a padded table (id < rows) gets the mean of the other rows, too.
    padded = {"embedding": rng.standard_normal((520, 8)).astype(np.float32)}
    fresh = load_tiny()
    grown, grown_cfg, ids = add_tokens(padded, cfg, fresh, ["[ECG0]"])
    assert ids == [512] and grown["embedding"].shape == (520, 8) and grown_cfg.vocab_size == 520
    others = np.delete(padded["embedding"], 512, axis=0)
    np.testing.assert_allclose(grown["embedding"][512], others.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.delete(np.asarray(grown["embedding"]), 512, axis=0), others)


def test_stage2_trains_only_new_rows_and_the_alignment_head(trained):
    history = trained["history"]
    assert history[-1]["token_nll"] < history[0]["token_nll"] - 1.0, history
    old, new = trained["stage1_params"], trained["params"]
    ids = list(trained["config"].model.ecg_token_ids)
    for got, want in zip(jax.tree.leaves(new["ecg_tower"]), jax.tree.leaves(old["ecg_tower"])):
        np.testing.assert_array_equal(got, want)
    for name in old["llm"]:
        if name in ("embedding", "lm_head"):
            continue
        for got, want in zip(jax.tree.leaves(new["llm"][name]), jax.tree.leaves(old["llm"][name])):
            np.testing.assert_array_equal(got, want)
    vocab = old["llm"]["embedding"].shape[0]
    np.testing.assert_array_equal(new["llm"]["embedding"][:vocab], old["llm"]["embedding"])
    np.testing.assert_array_equal(new["llm"]["lm_head"]["kernel"][:, :vocab],
                                  old["llm"]["lm_head"]["kernel"])
    mean_row = old["llm"]["embedding"].mean(0)
    assert all(np.abs(new["llm"]["embedding"][i] - mean_row).max() > 1e-3 for i in ids)
    model, _ = build_stage2(trained["config"].model)
    initial = nn.meta.unbox(jax.jit(lambda r: init_stage2_params(model, r))(jax.random.PRNGKey(0)))
    changed = [np.abs(np.asarray(a) - np.asarray(b)).max() > 0 for a, b in
               zip(jax.tree.leaves(new["alignment"]), jax.tree.leaves(initial["alignment"]))]
    assert all(changed)


def test_stage2_greedy_interpretation_equals_stage1(trained):
    from uniecg_jax.data.bundled import bundled_split

    ecgs = np.stack([r.to_encoder_input() for r in bundled_split(5, 0, 0)["test"][:3]])
    stage1 = Interpreter.load(trained["stage1_dir"]).interpret(ecgs, max_new_tokens=8)
    unified = UnifiedModel.load(trained["stage2_dir"])
    assert unified.interpreter().interpret(ecgs, max_new_tokens=8) == stage1
    turn = unified.chat("Interpret this 12-lead ECG and give the evidence for your diagnosis.",
                        ecg=ecgs[0], max_new_tokens=8)
    assert not turn.emitted_ecg_tokens and turn.text == stage1[0] and turn.generated_ecg is None


@pytest.mark.slow
def test_chat_emits_ecg_tokens_for_a_request_and_writes_a_readable_wfdb(trained, tiny_diffusion,
                                                                        tmp_path):
    import wfdb

    unified = UnifiedModel.load(trained["stage2_dir"], diffusion=tiny_diffusion[0])
    turn = unified.chat(REQUEST, out_dir=str(tmp_path), steps=2, max_new_tokens=8)
    assert turn.emitted_ecg_tokens
    assert turn.token_ids == list(unified.ecg_token_ids)
    # Conditions come from the attribute head; explicit values and the regex flag override it.
    assert turn.conditions == turn.predicted_conditions and set(
        turn.conditions_source.values()) == {"model"}
    assert 20 <= turn.conditions["heart_rate"] <= 300 and turn.conditions["sex"] in ("M", "F")
    parsed = unified.chat(REQUEST, steps=2, max_new_tokens=8, parse_request=True, age=33)
    assert parsed.conditions == {"sex": "F", "age": 33.0, "heart_rate": 110.0}
    assert parsed.conditions_source == {"sex": "text", "age": "argument", "heart_rate": "text"}
    assert turn.condition.shape == (TEXT_DIM,) and np.isfinite(turn.condition).all()
    record = wfdb.rdrecord(turn.files[0])
    assert record.n_sig == 12 and record.sig_len == 1024 and record.sig_name[6] == "V1"
    assert os.path.isfile(turn.files[0] + ".png")
    # The condition is the alignment head on the [ECG] hidden states of prompt + answer.
    ids = np.asarray([unified.text_prompt_ids(REQUEST) + turn.token_ids])
    _, condition, _ = unified.model.apply({"params": unified.params}, ids)
    np.testing.assert_allclose(turn.condition, condition[0], atol=1e-5)


def test_stage2_training_requests_are_the_served_prompts(trained):
    """A stage-2 training conversation holds, before its answer, exactly the ids `UnifiedModel`
    serves for the same request (one user turn: `InputBuilder.request_ids`; a follow-up after a
    turn about the report: the whole conversation); the loader's rows are such conversations, and
    the interpretation path uses the same builder."""
    from uniecg_jax.data import load_bundled_records
    from uniecg_jax.data.pipelines import records_source, stage2_loader
    from uniecg_jax.data.text_encoder import HashingTextEncoder

    unified = UnifiedModel.load(trained["stage2_dir"])
    inputs, ids = unified.inputs, list(unified.ecg_token_ids)
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(12):
        request = stage2_request("sinus bradycardia", {"heart_rate": 52.0, "age": 70.0, "sex": "F"},
                                 rng, negative_probability=0.3, follow_up_probability=0.3)
        fields = stage2_fields(inputs, request, ids, max_length=200)
        served = unified.text_prompt_ids(list(request.turns))
        assert fields["input_ids"][:len(served)].tolist() == served
        answer = fields["input_ids"][len(served):fields["attention_mask"].sum()].tolist()
        assert (answer[:len(ids)] == ids) == request.is_generation
        if len(request.turns) == 1:
            assert served == inputs.request_ids(request.turns[0][1])
        kinds.add((request.is_generation, len(request.turns)))
    assert kinds == {(True, 1), (True, 3), (False, 1)}, kinds
    records = load_bundled_records()[:4]
    source = records_source(records, text_encoder=HashingTextEncoder(TEXT_DIM))
    batch = next(iter(stage2_loader(source, unified.tokenizer, num_ecg_tokens=len(ids),
                                    max_length=400, batch_size=4, shuffle=False, process_index=0,
                                    process_count=1)))
    for row in range(4):
        start = int(batch["ecg_token_positions"][row][0])
        assert batch["input_ids"][row][start:start + len(ids)].tolist() == ids
        assert unified.tokenizer.decode(batch["input_ids"][row][:start]).endswith(" ASSISTANT: ")
    assert unified.interpreter().inputs.prompt_ids("Hi", True) == unified.inputs.prompt_ids(
        "Hi", True)


def test_the_model_decides_generation_requests_from_questions_and_interpretations(trained):
    """After training, [ECG] for requests in several trained phrasings (stated attributes in
    varied forms) and none for an interpretation with an ECG. (General questions answered in
    words are trained too, but 40 steps on a random tiny LLM do not yet separate them: the demo
    measures that decision, trained vs held-out phrasings.)"""
    from uniecg_jax.data.bundled import bundled_split

    unified = UnifiedModel.load(trained["stage2_dir"])
    rng = np.random.default_rng(3)
    requests = [list(generation_request("sinus tachycardia", {"heart_rate": 120.0, "age": 70.0,
                                                              "sex": "F"}, rng).turns)
                for _ in range(6)]
    requests += [[("user", TRAINED_REQUESTS[i].format(report="sinus rhythm", attrs=""))]
                 for i in (0, 4, 8)]
    _, _, emitted = unified.respond(requests, max_new_tokens=6)
    assert emitted.all(), (requests, emitted)
    ecgs = np.stack([r.to_encoder_input() for r in bundled_split(5, 0, 0)["test"][:2]])
    _, _, emitted = unified.respond(["Interpret this 12-lead ECG and give the evidence for your "
                                     "diagnosis."] * 2, ecgs, max_new_tokens=6)
    assert not emitted.any()


def _toy_attribute_run(tmp_path, monkeypatch, extra, records=None):
    """Stage 2 on a toy set (default: one report, every request stating its record's rate, 50 or
    130 bpm; age and sex vary independently of it), from a random tiny stage-1 model."""
    import uniecg_jax.train.stage2 as stage2_trainer
    from uniecg_jax.data.pipelines import records_source
    from uniecg_jax.data.record import ECGRecord
    from uniecg_jax.data.text_encoder import HashingTextEncoder

    if records is None:
        records = [ECGRecord(signal=np.zeros((12, 5000), np.float32), fs=500.0,
                             record_id=f"toy{i}", report="sinus rhythm",
                             heart_rate=float((50, 130)[i % 2]), age=float(30 + 7 * (i // 4)),
                             sex="MF"[(i // 2) % 2]) for i in range(32)]
    source = records_source(records, text_encoder=HashingTextEncoder(TEXT_DIM))
    monkeypatch.setattr(stage2_trainer, "stage2_data_source", lambda config, split: source)
    config = load_config("configs/stage2.py:tiny", [
        f"text.encoder=hash:{TEXT_DIM}", f"text.embed_dim={TEXT_DIM}", "model.num_ecg_tokens=4",
        "model.llm.num_layers=1", "model.ecg_encoder.layers=1", "data.max_length=64",
        "train.log_every=10", "train.checkpoint_every=0", "train.learning_rate=5e-3",
        "train.warmup_steps=2", "train.preservation_weight=0", "data.negative_fraction=0",
        "data.follow_up_fraction=0", "data.state_fraction=1"] + list(extra))
    task = build_task(config)
    result = train(task.config, str(tmp_path), task)
    return task, jax.device_get(result.state.params)


def test_attribute_head_reads_the_stated_rate(tmp_path, monkeypatch):
    task, params = _toy_attribute_run(tmp_path, monkeypatch, ["train.steps=60"])
    task.export(str(tmp_path), params)
    unified = UnifiedModel.load(str(tmp_path))
    rates = [50.0, 130.0] * 5
    prompts = [TRAINED_REQUESTS[i].format(report="sinus rhythm", attrs=f" at {rate:.0f} bpm")
               for i, rate in enumerate(rates)]
    _, _, emitted, attributes = unified.respond(prompts, max_new_tokens=6, with_attributes=True)
    assert emitted.all()
    predicted = attributes["heart_rate"]
    assert np.corrcoef(rates, predicted)[0, 1] > 0.8, predicted
    assert predicted[1::2].mean() - predicted[::2].mean() > 40, predicted


def _rate_records(rates, seed):
    """Toy records stating `rates`; report, age and sex drawn independently of the rate."""
    from uniecg_jax.data.record import ECGRecord

    rng = np.random.default_rng(seed)
    reports = ("sinus rhythm", "normal ECG", "left axis deviation", "first degree AV block")
    return [ECGRecord(signal=np.zeros((12, 5000), np.float32), fs=500.0, record_id=f"r{seed}_{i}",
                      report=reports[rng.integers(len(reports))], heart_rate=float(rate),
                      age=float(rng.integers(20, 90)), sex="MF"[rng.integers(2)])
            for i, rate in enumerate(rates)]


def test_attribute_head_reads_stated_rates_of_held_out_requests_without_collapsing(
        tmp_path, monkeypatch):
    """Rates 40-150 bpm stated in the trained forms, at the tests' aggressive learning rate
    (2e-2): the head must read unseen rates (odd; trained on even) in held-out phrasings too. The
    unnormalised read-out (`qk_norm=False, context_window=1`, checkpoints before them) fails
    here: its attention logits' spread grows to ~30, one token takes the softmax and every request
    gets ~the same rate (trained / held-out phrasings: r -0.11 / -0.31, MAE 30.5 / 32.0 bpm
    against 30.1 for the mean guess); the current head reads them (r 0.62 / 0.70, MAE 22.1 /
    19.5). Run on the final states alone (no embeddings, no lookahead), the head this test was
    written for. ~55 s on 2 cores."""
    scores = _held_out_rate_scores(
        tmp_path, monkeypatch, ["train.learning_rate=2e-2", "model.attributes.lookahead=0",
                                "model.attributes.read_embeddings=False",
                                "model.attributes.read_numbers=False"])
    for phrasing in ("trained", "held_out"):
        correlation, error, mean_guess = scores[phrasing]
        assert correlation > 0.45, (phrasing, correlation)
        assert error < 0.8 * mean_guess, (phrasing, error, mean_guess)


def test_attribute_head_reads_stated_rates_from_the_digits_embeddings(tmp_path, monkeypatch):
    """The head without the number pointer (`read_numbers=False`; the request's token embeddings
    beside its final states, one token ahead) at the demo's learning rate: unseen rates in
    trained phrasings within 0.45 of the mean guess's error (measured: MAE 8.7-11.4 bpm, r
    0.95-0.97, mean guess 30.1; on the final states alone 17.1, r 0.80, which fails), held-out
    phrasings r > 0.8 (0.88-0.90; alone 0.75). ~55 s."""
    scores = _held_out_rate_scores(tmp_path, monkeypatch, ["train.learning_rate=5e-3",
                                                           "model.attributes.read_numbers=False"])
    correlation, error, mean_guess = scores["trained"]
    assert correlation > 0.9 and error < 0.45 * mean_guess, scores
    assert scores["held_out"][0] > 0.8, scores


def test_attribute_head_points_at_the_stated_number(tmp_path, monkeypatch):
    """The default head (`read_numbers`: a learned pointer over the request's numbers,
    `point_at_numbers`) reads unseen rates stated in trained phrasings to within a bpm, beside an
    age stated in the same request (measured: MAE 0.12 bpm, r 1.000; without the pointer, from
    the digits' embeddings, 11.4 bpm, r 0.95, which fails). Held-out phrasings ("pulse 81",
    "beating at 131 per minute"), whose words the toy's random LLM has never seen, stay better
    than the mean guess (14.8 against 30.1). ~55 s."""
    scores = _held_out_rate_scores(tmp_path, monkeypatch, ["train.learning_rate=5e-3"])
    correlation, error, mean_guess = scores["trained"]
    assert correlation > 0.99 and error < 1.5, scores
    assert scores["held_out"][1] < 0.8 * scores["held_out"][2], scores
    # The sex stated beside them ("woman", "female", "F"), read by the sex-word pointer
    # (measured: 1.00 on trained phrasings).
    assert scores["trained_sex_accuracy"] >= 0.9, scores


def test_number_features_compose_a_number_from_its_pieces():
    """Values at each number's last piece, for the tiny BPE (" 1", "3", "0") and a
    digit-splitting SentencePiece layout ("▁" apart); saturated, not inf / NaN, for a long run."""
    from uniecg_jax.data.tokenizer import load_tiny, numeral_pieces
    from uniecg_jax.models.alignment import number_features

    tokenizer = load_tiny()
    numerals = numeral_pieces(tokenizer)
    assert (282, " 1") in numerals and (20, "0") in numerals
    text = "at 130 bpm, HR 104, rate 45/min, aged 7, id 12345678901234567890"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    features = np.asarray(number_features(jnp.asarray([ids]), numerals))[0]
    assert np.isfinite(features).all()
    assert [round(v * 100, 3) for v in features[features[:, 1] == 1, 0]] == [
        130, 104, 45, 7, 1000]
    assert not features[features[:, 1] == 0].any()
    digits = tuple((i, str(i)) for i in range(10))          # "▁" = 100, "b" = 101
    features = np.asarray(number_features(jnp.asarray([[100, 1, 3, 0, 101, 100, 7, 5]]), digits))
    np.testing.assert_allclose(features[0, :, 0], [0, 0, 0, 1.3, 0, 0, 0, 0.75])


def test_the_number_pointer_falls_back_to_the_inferred_value():
    """A request without numbers gives "none" all the weight (the head's words-only estimate);
    with one, a pointer that favours it returns its value, in its own units."""
    import flax.linen as nn
    from uniecg_jax.models.alignment import AttributeConfig, point_at_numbers

    class Pointer(nn.Module):
        @nn.compact
        def __call__(self, features, numbers, mask):
            return point_at_numbers(self, AttributeConfig(hidden_dim=8, heads=2), features,
                                    numbers, mask)

    features, mask = jnp.ones((2, 4, 6)), jnp.ones((2, 4), bool)
    numbers = jnp.zeros((2, 4, 2)).at[1, 2].set(jnp.array([1.3, 1.0]))
    params = Pointer().init(jax.random.PRNGKey(0), features, numbers, mask)
    value, none = Pointer().apply(params, features, numbers, mask)
    np.testing.assert_allclose(none[0], [1.0, 1.0])
    np.testing.assert_allclose(value[0], [0.0, 0.0])
    # "none" starts at logit 0; the number's logit is temperature x cosine: push it up.
    params["params"]["number_none"] = jnp.full((2,), -30.0)
    value, none = Pointer().apply(params, features, numbers, mask)
    np.testing.assert_allclose(value[1], [130.0, 130.0], rtol=1e-5)
    assert float(none[1].max()) < 1e-6
    # A number outside the request (mask False) is never pointed at.
    value, none = Pointer().apply(params, features, numbers, mask.at[1, 2].set(False))
    np.testing.assert_allclose(none[1], [1.0, 1.0])


def test_the_sex_word_pointer_reads_the_word_it_points_at():
    """With "none" pushed down and the query aimed at one token's key, the male logit is that
    token's `sex_value`, whatever the other tokens say; with "none" up, the words-only logit."""
    import flax.linen as nn
    from uniecg_jax.models.alignment import AttributeConfig, point_at_sex_words

    class Pointer(nn.Module):
        @nn.compact
        def __call__(self, features, mask):
            return point_at_sex_words(self, AttributeConfig(hidden_dim=8, heads=2), features, mask)

    features = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 6))
    mask = jnp.ones((2, 5), bool).at[1, 4].set(False)
    params = nn.meta.unbox(Pointer().init(jax.random.PRNGKey(0), features, mask))
    p = params["params"]
    _, none = Pointer().apply(params, features, mask)
    assert 0.0 < float(none.min()) and float(none.max()) < 1.0
    # Aim the query at token 2 of row 0 and sharpen: it alone is pointed at.
    key = features[0, 2] @ p["sex_key"]["kernel"].reshape(6, -1) + p["sex_key"]["bias"].ravel()
    p["sex_queries"] = key.reshape(1, -1) / jnp.linalg.norm(key)
    p["sex_log_temperature"] = jnp.full((1,), 10.0)
    p["sex_none"] = jnp.full((1,), -30.0)
    value, none = Pointer().apply(params, features, mask)
    token_value = features[0, 2] @ p["sex_value"]["kernel"].ravel() + p["sex_value"]["bias"][0]
    np.testing.assert_allclose(value[0], token_value, rtol=1e-4)
    assert float(none[0]) < 1e-6
    # A masked token (outside the request) is never pointed at; an empty request is all "none".
    _, none = Pointer().apply(params, features, jnp.zeros((2, 5), bool))
    np.testing.assert_allclose(none, [1.0, 1.0])


def _held_out_rate_scores(tmp_path, monkeypatch, extra) -> dict:
    """Trains on toy records stating even rates 40-150 bpm (trained forms), then reads 32 unseen
    odd rates stated in trained and in held-out phrasings. {phrasing: (pearson r, MAE, MAE of
    the mean guess), f"{phrasing}_sex_accuracy": accuracy of the sex stated beside them}."""
    from uniecg_jax.data.chat_format import InputBuilder
    from uniecg_jax.models.stage2 import UniECGStage2

    rng = np.random.default_rng(0)
    train_records = _rate_records(rng.choice(np.arange(40, 152, 2), 96), 1)
    task, params = _toy_attribute_run(tmp_path, monkeypatch, [
        "train.steps=160", "train.warmup_steps=10", "train.log_every=80",
        "data.max_length=96", *extra], records=train_records)
    model, config = build_stage2(task.config.model)
    assert config.attributes.qk_norm
    inputs = InputBuilder.for_model(task.tokenizer, {})
    held_out = _rate_records(rng.choice(np.arange(41, 151, 2), 32), 2)
    scores = {}
    for phrasing in ("trained", "held_out"):
        request_rng = np.random.default_rng(5)
        rows = [stage2_fields(inputs, generation_request(
            r.report, {"heart_rate": r.heart_rate, "age": r.age, "sex": r.sex}, request_rng,
            phrasing=phrasing, state_probability=1.0), config.ecg_token_ids, 96)
            for r in held_out]
        _, _, valid, attributes = model.apply(
            {"params": params}, jnp.asarray(np.stack([f["input_ids"] for f in rows])),
            jnp.asarray(np.stack([f["attention_mask"] for f in rows])),
            method=UniECGStage2.generate_outputs)
        assert np.asarray(valid).all()
        rates = np.array([r.heart_rate for r in held_out])
        predicted = np.asarray(attributes["heart_rate"])
        scores[phrasing] = (float(np.corrcoef(rates, predicted)[0, 1]),
                            float(np.abs(predicted - rates).mean()),
                            float(np.abs(rates - rates.mean()).mean()))
        male = np.array([r.sex == "M" for r in held_out])
        scores[f"{phrasing}_sex_accuracy"] = float(
            ((np.asarray(attributes["male_logit"]) > 0) == male).mean())
    return scores


def test_checkpoints_without_qk_norm_keep_the_unnormalised_attribute_head():
    """A checkpoint's config written before `model.attributes.qk_norm` builds the head its weights
    were trained as (same parameter names and shapes); new configs state the normalised,
    windowed one."""
    from uniecg_jax.layers.params import path_name
    from uniecg_jax.models.alignment import AttributeConfig, AttributeHead

    newer = ("qk_norm", "context_window", "lookahead", "read_embeddings", "read_numbers",
             "numerals", "read_sex_words")
    old = {k: v for k, v in AttributeConfig().to_dict().items() if k not in newer}
    legacy_config = AttributeConfig.from_config(dict(old, hidden_dim=8, heads=2))
    assert (legacy_config.qk_norm, legacy_config.context_window, legacy_config.lookahead,
            legacy_config.read_embeddings) == (False, 1, 0, False)
    # Written with qk_norm / context_window, before lookahead / read_embeddings.
    windowed_config = AttributeConfig.from_config(dict(old, hidden_dim=8, heads=2, qk_norm=True,
                                                       context_window=3))
    assert (windowed_config.lookahead, windowed_config.read_embeddings) == (0, False)
    # Written with read_embeddings, before read_numbers.
    embedded_config = AttributeConfig.from_config(dict(old, hidden_dim=8, heads=2, qk_norm=True,
                                                       context_window=3, lookahead=1,
                                                       read_embeddings=True))
    assert not embedded_config.read_numbers
    new_config = AttributeConfig.from_config(AttributeConfig(hidden_dim=8, heads=2).to_dict())
    assert (new_config.qk_norm, new_config.context_window, new_config.lookahead,
            new_config.read_embeddings, new_config.read_numbers) == (True, 3, 1, True, True)
    assert _stage2_config().model.attributes.qk_norm is True
    args = (jnp.ones((1, 2, 16)), jnp.ones((1, 2), bool), jnp.ones((1, 5, 16)),
            jnp.ones((1, 5), bool), jnp.ones((1, 5, 16)), jnp.ones((1, 5, 2)))

    def shapes(config):
        params = nn.meta.unbox(AttributeHead(config).init(jax.random.PRNGKey(0), *args))
        return {path_name(path): leaf.shape
                for path, leaf in jax.tree_util.tree_flatten_with_path(params["params"])[0]}
    legacy, windowed, new = shapes(legacy_config), shapes(windowed_config), shapes(new_config)
    embedded = shapes(embedded_config)
    assert sorted(legacy) == sorted(f"{m}/{p}" for m in ("input", "key", "output", "query", "value")
                                    for p in ("bias", "kernel"))
    # 3 tokens' states; (3 back + 1 ahead) x (state + embedding).
    assert legacy["key/kernel"] == (16, 2, 4) and windowed["key/kernel"] == (48, 2, 4)
    assert new["key/kernel"] == (128, 2, 4)
    assert set(windowed) - set(legacy) == {"log_temperature", "context_norm/bias",
                                           "context_norm/scale", "query_norm/bias",
                                           "query_norm/scale"}
    assert set(embedded) - set(windowed) == {"embedding_norm/bias", "embedding_norm/scale"}
    # Written with read_numbers, before read_sex_words.
    numbers_config = AttributeConfig.from_config(dict(old, hidden_dim=8, heads=2, qk_norm=True,
                                                      context_window=3, lookahead=1,
                                                      read_embeddings=True, read_numbers=True))
    assert numbers_config.read_numbers and not numbers_config.read_sex_words
    assert new_config.read_sex_words
    numbers = shapes(numbers_config)
    assert set(numbers) - set(embedded) == {"number_key/bias", "number_key/kernel",
                                            "number_queries", "number_log_temperature",
                                            "number_none"}
    assert set(new) - set(numbers) == {"sex_key/bias", "sex_key/kernel", "sex_queries",
                                       "sex_log_temperature", "sex_none", "sex_value/bias",
                                       "sex_value/kernel"}


def test_the_attribute_head_reads_digits_from_the_token_embeddings():
    """The read-out sees each request token's input embedding: the prediction moves when only a
    digit's embedding changes (same final states); without `read_embeddings` it cannot."""
    from uniecg_jax.models.alignment import AttributeConfig, AttributeHead

    rng = np.random.default_rng(0)
    ecg, valid = jnp.asarray(rng.normal(size=(1, 2, 16))), jnp.ones((1, 2), bool)
    context, mask = rng.normal(size=(1, 6, 16)), np.ones((1, 6), bool)
    mask[0, 5] = False                          # the last slot is not a request token
    embeddings = rng.normal(size=(1, 6, 16))
    digit = embeddings.copy()
    digit[0, 2] = rng.normal(size=16)           # another digit at token 2, same final states

    def rate(config, states, embedded):
        head = AttributeHead(config)
        params = head.init(jax.random.PRNGKey(0), ecg, valid, jnp.asarray(context),
                           jnp.asarray(mask), jnp.asarray(embeddings))
        # The output layer starts at zero (every rate the centre): move every weight a little.
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
        params = jax.tree.unflatten(tree, [leaf + 0.1 * jax.random.normal(key, leaf.shape)
                                           for leaf, key in zip(leaves, keys)])
        return float(head.apply(params, ecg, valid, jnp.asarray(states), jnp.asarray(mask),
                                jnp.asarray(embedded))["heart_rate"][0])

    full = AttributeConfig(hidden_dim=8, heads=2, context_window=1, lookahead=1,
                           read_numbers=False)
    assert rate(full, context, digit) != rate(full, context, embeddings)
    states_only = AttributeConfig(hidden_dim=8, heads=2, context_window=1, lookahead=0,
                                  read_embeddings=False, read_numbers=False)
    assert rate(states_only, context, digit) == rate(states_only, context, embeddings)


def test_an_overlong_request_keeps_the_attributes_it_states():
    """Cut before its last third, a request too long for max_length keeps its opening and the
    stated rate at its end (cut at the end, 14% of the demo's rate-stating requests lost it)."""
    from uniecg_jax.data.chat_format import InputBuilder
    from uniecg_jax.data.conversations import Stage2Request
    from uniecg_jax.data.tokenizer import add_ecg_tokens, load_tokenizer

    tokenizer = load_tokenizer(None)
    ids = add_ecg_tokens(tokenizer, 4)
    text = ("Generate a 12-lead ECG that matches this report: sinus rhythm, left axis deviation, "
            "first degree AV block, possible left ventricular hypertrophy at 130 bpm")
    fields = stage2_fields(InputBuilder.for_model(tokenizer, {}),
                           Stage2Request((("user", text),), True), ids, max_length=64)
    start = int(fields["ecg_token_positions"][0])
    kept = tokenizer.decode(fields["input_ids"][:start])
    assert kept.startswith("<s>USER: Generate") and kept.endswith(" at 130 bpm ASSISTANT: "), kept
    assert fields["input_ids"][start:start + 4].tolist() == ids


def test_zero_attribute_loss_weights_leave_the_head_at_init(tmp_path, monkeypatch):
    task, params = _toy_attribute_run(tmp_path, monkeypatch, [
        "train.steps=3", "train.heart_rate_weight=0", "train.age_weight=0", "train.sex_weight=0"])
    # The trainer's init (jitted onto the mesh) and this eager one differ in the last bit; one
    # Adam step at this learning rate moves a weight by ~5e-3, so 1e-6 still catches any update.
    initial = nn.meta.unbox(task.init_params(jax.random.PRNGKey(int(task.config.seed))))
    for got, want in zip(jax.tree.leaves(params["attributes"]),
                         jax.tree.leaves(initial["attributes"])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)
    changed = [np.abs(np.asarray(a) - np.asarray(b)).max() > 0 for a, b in
               zip(jax.tree.leaves(params["alignment"]), jax.tree.leaves(initial["alignment"]))]
    assert all(changed)    # the same run trains the alignment head


def test_chat_samples_with_the_diffusion_checkpoints_sample_settings(trained, tiny_diffusion):
    pipeline, config = tiny_diffusion
    config = config.copy_and_resolve_references()
    config.sample.update(dict(sampler="ddpm", steps=7, guidance=2.5, eta=0.3, output_rate=500.0))
    calls = []

    class Recording:
        def generate(self, *args, **kwargs):
            calls.append(kwargs)
            return np.zeros((1, 12, 5000), np.float32)

    unified = UnifiedModel.load(trained["stage2_dir"], diffusion=(Recording(), config))
    turn = unified.chat(REQUEST, max_new_tokens=8)
    assert turn.emitted_ecg_tokens and len(calls) == 1
    assert {k: calls[0][k] for k in ("sampler", "steps", "guidance", "eta", "sample_rate")} == {
        "sampler": "ddpm", "steps": 7, "guidance": 2.5, "eta": 0.3, "sample_rate": 500.0}
    unified.chat(REQUEST, max_new_tokens=8, steps=3)   # an explicit argument wins
    assert calls[1]["steps"] == 3 and calls[1]["sampler"] == "ddpm"


def test_parse_conditions():
    assert parse_conditions("a 45-year-old man with heart rate of 52") == {
        "sex": "M", "age": 45.0, "heart_rate": 52.0}
    assert parse_conditions("female, age 71, 130 bpm") == {"sex": "F", "age": 71.0,
                                                           "heart_rate": 130.0}
    assert parse_conditions("sinus rhythm") == {"sex": None, "age": None, "heart_rate": None}


@pytest.mark.slow
def test_whole_model_hf_export_round_trips(trained, tiny_diffusion, tmp_path):
    import transformers

    from uniecg_jax.convert.unified_export import export_unified, load_unified_export

    from uniecg_jax.convert import unified_export

    out = str(tmp_path / "hf")
    placements = []
    save_hf = unified_export.save_hf
    with pytest.MonkeyPatch.context() as patched:   # what the LLM writer is handed
        patched.setattr(unified_export, "save_hf", lambda params, *a, **k: placements.extend(
            leaf.sharding for leaf in jax.tree.leaves(params)) or save_hf(params, *a, **k))
        export_unified(trained["stage2_dir"], out, diffusion=tiny_diffusion)
    # Restored fsdp-sharded over the 8 devices (as on a pod, where no host holds the whole model).
    assert all(len(s.device_set) == 8 for s in placements)
    assert any(not s.is_fully_replicated for s in placements)
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "llm"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(out, "llm"))
    ids = list(trained["config"].model.ecg_token_ids)
    assert [tokenizer.convert_tokens_to_ids(f"[ECG{i}]") for i in range(len(ids))] == ids
    np.testing.assert_array_equal(hf.get_input_embeddings().weight.detach().numpy()[ids],
                                  trained["params"]["llm"]["embedding"][ids])
    rebuilt = load_unified_export(out)
    for got, want in zip(jax.tree.leaves(rebuilt.params), jax.tree.leaves(trained["params"])):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for got, want in zip(jax.tree.leaves(rebuilt.diffusion.unet_params),
                         jax.tree.leaves(tiny_diffusion[0].unet_params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert rebuilt.chat(REQUEST, max_new_tokens=8).token_ids == list(ids)


def test_bad_stage2_configs_fail_clearly():
    with pytest.raises(ConfigError, match="weight_decay"):
        build_task(_stage2_config(["train.weight_decay=0.1"]))
    with pytest.raises(ConfigError, match="num_ecg_tokens"):
        build_task(_stage2_config(["model.num_ecg_tokens=0"]))


@pytest.mark.slow
def test_stage2_kill_and_resume_equals_uninterrupted(tmp_path, resume_after_preemption):
    config = _stage2_config(["train.steps=4", "train.log_every=1"])
    full = train(config, str(tmp_path / "full"), build_task(config))
    resumed = resume_after_preemption(config, str(tmp_path / "resumed"), build_task, 2)
    assert resumed.steps_run == 2
    assert_trees_equal(resumed.state.params, full.state.params)


def test_stage2_keeps_a_gem_derived_stage1_input_layout(tmp_path):
    """A stage 1 with GEM's layout (llava_v1 prompt, sentinel placeholder, MIMIC lead order) gives
    a stage 2 with the same `model.input`: its requests carry LLaVA's system text, its tokenizer
    gets the [ECG] rows but no `<ecg>` row, and its interpretation batches splice at the
    sentinel (issue 14: the [ECG] tokens of stage 2 still add rows, the placeholder does not)."""
    from uniecg_jax.data import load_bundled_records
    from uniecg_jax.data.chat_format import ECG_PLACEHOLDER, LLAVA_V1, SENTINEL_PLACEHOLDER_ID
    from uniecg_jax.data.pipelines import records_source, stage1_loader, stage2_loader
    from uniecg_jax.data.text_encoder import HashingTextEncoder
    from uniecg_jax.train.stage2 import finalize_stage2_config

    gem_input = ["model.input.prompt_format=llava_v1", "model.input.placeholder=sentinel",
                 "model.input.ecg_lead_order=mimic_iv"]
    stage1_task = build_task(load_config("configs/stage1.py:tiny", STAGE1 + gem_input))
    params = jax.device_get(jax.jit(lambda rng: nn.meta.unbox(stage1_task.init_params(rng)))(
        jax.random.PRNGKey(0)))
    stage1_task.export(str(tmp_path / "stage1"), params)

    config, tokenizer, _, _, _ = finalize_stage2_config(
        _stage2_config([f"init.stage1_ckpt={tmp_path / 'stage1'}"]))
    assert config.model.input.to_dict() == {"prompt_format": "llava_v1",
                                            "placeholder": "sentinel", "ecg_lead_order": "mimic_iv"}
    ids = list(config.model.ecg_token_ids)
    assert ids == list(range(len(tokenizer) - 4, len(tokenizer)))   # the 4 [ECG] rows, appended
    source = records_source(load_bundled_records()[:2], text_encoder=HashingTextEncoder(TEXT_DIM))
    batch = next(iter(stage2_loader(source, tokenizer, num_ecg_tokens=4, max_length=400,
                                    batch_size=2, shuffle=False, process_index=0,
                                    process_count=1, input_format=config.model.input)))
    assert tokenizer.decode(batch["input_ids"][0]).lstrip("<s> ").startswith(LLAVA_V1.system)
    interpret = next(iter(stage1_loader(source, tokenizer, max_length=200, batch_size=2,
                                        shuffle=False, process_index=0, process_count=1,
                                        input_format=config.model.input)))
    position = int(interpret["ecg_position"][0])
    assert interpret["input_ids"][0][position] == SENTINEL_PLACEHOLDER_ID
    assert tokenizer.convert_tokens_to_ids(ECG_PLACEHOLDER) not in interpret["input_ids"][0]


class _StubUnified:
    """A unified model for `request_metrics`: answers a text request with [ECG] when `emit(its last
    user text)` is true, never an interpretation; its attribute head always reads 100 bpm, 40
    years, female."""

    def __init__(self, emit):
        from types import SimpleNamespace

        self.emit = emit
        self.model = SimpleNamespace(config=SimpleNamespace(num_ecg_tokens=2))

    def respond(self, prompts, ecgs=None, *, max_new_tokens=None, with_attributes=False):
        n = len(prompts)
        flags = (np.zeros(n, bool) if ecgs is not None else
                 np.array([bool(self.emit(turns[-1][1])) for turns in prompts]))
        out = ([[] for _ in range(n)], np.zeros((n, 4), np.float32), flags)
        attributes = {"heart_rate": np.full(n, 100.0), "age": np.full(n, 40.0),
                      "male_logit": np.full(n, -1.0)}
        return out + (attributes,) if with_attributes else out


def test_request_metrics_score_the_decision_per_kind_and_attributes_stated_vs_implied():
    from uniecg_jax.data.record import ECGRecord
    from uniecg_jax.eval.llm_generate_eval import request_metrics

    records = [ECGRecord(signal=np.zeros((12, 500), np.float32), fs=50.0, record_id=f"r{i}",
                         report="sinus rhythm", heart_rate=float((80, 120)[i % 2]),
                         age=float(30 + 10 * i), sex="MF"[(i // 2) % 2]) for i in range(8)]
    ecgs = np.zeros((3, 12, 5000), np.float32)
    always = request_metrics(_StubUnified(lambda text: True), records, phrasing="trained",
                             draws=2, interpretation_ecgs=ecgs)
    decision = always["decision"]
    assert decision["generation_requests"] == 16 and decision["other_requests"] == 16 + 3
    assert decision["recall"] == 1.0 and decision["precision"] == pytest.approx(16 / 32)
    by_kind = decision["emitted_by_kind"]
    assert by_kind["interpretation"] == (0.0, 3)
    assert by_kind["general"][0] == 1.0 and by_kind["report_question"][0] == 1.0
    assert by_kind["request"][1] + by_kind.get("follow_up", (0, 0))[1] == 16
    assert always["answered"] == 16
    rate = always["attributes"]["heart_rate"]
    assert rate["stated"]["requests"] + rate["implied"]["requests"] == 16
    assert rate["stated"]["requests"] > 0 and rate["implied"]["requests"] > 0
    # The stub reads 100 bpm for 80 / 120 bpm records; the regular expressions read a stated rate
    # exactly and default the others to 70 (|error| 10 or 50).
    assert rate["stated"]["model"] == pytest.approx(20.0) and rate["stated"]["baseline"] == 0.0
    assert rate["implied"]["model"] == pytest.approx(20.0)
    assert 10.0 < rate["implied"]["baseline"] < 50.0
    sex = always["attributes"]["sex"]
    assert 0.0 < sex["stated"]["model"] < 1.0 and sex["stated"]["baseline"] == 1.0

    never = request_metrics(_StubUnified(lambda text: False), records, phrasing="held_out")
    assert never["decision"]["recall"] == 0.0 and never["decision"]["precision"] == 0.0
    assert never["answered"] == 0
    assert np.isnan(never["attributes"]["age"]["stated"]["model"])

    # Per wording: a model that answers only one held-out wording with [ECG] is seen doing so.
    from uniecg_jax.data.conversations import HELD_OUT_REQUESTS
    wording = HELD_OUT_REQUESTS[1]
    one = request_metrics(_StubUnified(lambda text: text.startswith("Show me what")), records,
                          phrasing="held_out", draws=4)["decision"]["emitted_by_template"]
    assert one[wording][0] == 1.0 and one[wording][1] > 0
    assert all(share == 0.0 for template, (share, _) in one.items() if template != wording)
    assert sum(count for _, count in one.values()) == 2 * 4 * len(records)


def test_the_data_seed_is_shared_by_training_seeds():
    from uniecg_jax.train.stage2 import data_seed

    assert data_seed(_stage2_config(["seed=3"])) == 3
    assert data_seed(_stage2_config(["seed=3", "data.seed=0"])) == 0


def test_the_demo_prints_request_scores_per_seed():
    from uniecg_jax.data.record import ECGRecord
    from uniecg_jax.demo.stage2 import _request_lines
    from uniecg_jax.eval.llm_generate_eval import request_metrics

    records = [ECGRecord(signal=np.zeros((12, 500), np.float32), fs=50.0, record_id=f"r{i}",
                         report="sinus bradycardia", heart_rate=50.0, age=60.0, sex="F")
               for i in range(4)]
    per_seed = [{"requests": {phrasing: request_metrics(_StubUnified(emit), records,
                                                        phrasing=phrasing)
                              for phrasing in ("trained", "held_out")},
                 "generated_rate": {"model": [], "regex": [], "requests": 0}}
                for emit in (lambda text: True, lambda text: False)]
    lines = _request_lines(per_seed, (0, 1))
    assert lines[0] == "requests (values per training seed 0 / 1):"
    trained = next(line for line in lines if line.startswith("  trained phrasings"))
    assert "recall 1.00 / 0.00 (mean 0.50)" in trained, trained
    assert any(line.startswith("    answered with [ECG]: ") and "general" in line for line in lines)
    assert any(line.startswith("    heart_rate bpm MAE, stated") for line in lines)
    # The held-out wordings, one by one (only there: the trained ones are many and all pass).
    by_wording = [line for line in lines if line.startswith("    answered with [ECG], by wording")]
    assert len(by_wording) == 1 and "1.00 / 0.00" in by_wording[0]
    from uniecg_jax.data import conversations
    held_out = conversations.HELD_OUT_REQUESTS + conversations.HELD_OUT_FOLLOW_UPS
    assert any(wording[:20] in by_wording[0] for wording in held_out)
    assert not any(wording[:20] in by_wording[0] for wording in conversations.TRAINED_REQUESTS)


def test_the_training_mixture_holds_report_question_negatives_and_no_held_out_phrasing():
    """Stage-2 training draws (the demo's mixture) include questions about a report answered in
    words, and no held-out phrasing ever appears in them: each held-out template's longest literal
    piece is absent from every drawn conversation (so the held-out scores measure new wording)."""
    import re

    from uniecg_jax.data import conversations

    config = load_config("configs/stage2.py:demo")
    rng = np.random.default_rng(0)
    drawn = [stage2_request("sinus bradycardia", {"heart_rate": 50.0, "age": 70.0, "sex": "F"},
                            rng, negative_probability=float(config.data.negative_fraction),
                            follow_up_probability=float(config.data.follow_up_fraction),
                            state_probability=float(config.data.state_fraction))
             for _ in range(600)]
    kinds = [r.kind for r in drawn]
    assert set(kinds) == set(conversations.REQUEST_KINDS)
    report_questions = [r for r in drawn if r.kind == "report_question"]
    assert len(report_questions) >= 0.15 * len(drawn)
    assert not any(r.is_generation for r in report_questions)
    assert all("sinus bradycardia" in r.turns[-1][1] for r in report_questions)
    held_out = [*conversations.HELD_OUT_REQUESTS, *conversations.HELD_OUT_FOLLOW_UPS,
                *conversations.HELD_OUT_REPORT_QUESTIONS, *conversations.HELD_OUT_RATE_FORMS,
                *(q for q, _ in conversations.HELD_OUT_GENERAL_QUESTIONS),
                *(f for forms in conversations.HELD_OUT_PATIENT_FORMS.values() for f in forms)]
    texts = [" ".join(text for _, text in r.turns) for r in drawn]
    for template in held_out:
        piece = max(re.split(r"\{[^}]*\}", template), key=len)
        assert len(piece.strip()) >= 4, template
        assert not any(piece in text for text in texts), (template, piece)


def test_the_decision_loss_weighs_both_answers_alike():
    """The decision BCE is the mean of the generation rows' and the word rows' means, however
    many rows each class has (a row mean let 7 generation rows outweigh 1 question)."""
    from uniecg_jax.train.stage2 import decision_loss

    vocab, first_ecg = 6, 5
    logits = np.zeros((8, 4, vocab), np.float32)
    logits[:, 1, first_ecg] = np.log(3.0) + np.log(vocab - 1)   # p([ECG0]) = 3 / 4 everywhere
    target_mask = np.zeros((8, 4), np.int32)
    target_mask[:, 1:] = 1                                        # every answer starts at t=1
    generation = np.arange(8) < 7
    loss, accuracy = decision_loss(jnp.asarray(logits), jnp.asarray(target_mask),
                                   jnp.asarray(generation), first_ecg)
    np.testing.assert_allclose(float(loss), (-np.log(0.75) - np.log(0.25)) / 2, rtol=1e-5)
    assert float(accuracy) == pytest.approx(7 / 8)
    only_generation, _ = decision_loss(jnp.asarray(logits), jnp.asarray(target_mask),
                                       jnp.asarray(np.ones(8, bool)), first_ecg)
    np.testing.assert_allclose(float(only_generation), -np.log(0.75), rtol=1e-5)


def _decision_model(with_decision=True):
    """The tiny stage-2 model (without `model.decision`, as a config written before it, unless
    `with_decision`) and params whose read-out weights are all moved off init."""
    from uniecg_jax.train.stage2 import finalize_stage2_config

    model_config = finalize_stage2_config(_stage2_config())[0].model.to_dict()
    if not with_decision:
        del model_config["decision"]
    model, s2cfg = build_stage2(model_config)
    params = jax.device_get(nn.meta.unbox(init_stage2_params(model, jax.random.PRNGKey(0))))
    if "decision" in params:
        leaves, tree = jax.tree.flatten(params["decision"])
        keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
        params["decision"] = jax.tree.unflatten(tree, [
            leaf + 0.05 * jax.random.normal(key, leaf.shape) for leaf, key in zip(leaves, keys)])
    return model, s2cfg, params


def test_the_decision_read_out_reads_every_request_token_and_only_those():
    """p([ECG0]) at the first answer token moves when a request token before the last changes
    (its final state, or only its id: the read-out also sees input embeddings), although the last
    token's state is the same (all the [ECG0] row could read); it does not move when a token
    outside the request changes; the word logits are untouched and the LLM's own [ECG0] logit is
    replaced."""
    from uniecg_jax.models.stage2 import UniECGStage2

    model, s2cfg, params = _decision_model()
    vocab, width = s2cfg.unified.llm.vocab_size, s2cfg.unified.llm.hidden_size
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(1, 8, width)).astype(np.float32)
    ids = rng.integers(5, 40, size=(1, 8)).astype(np.int32)
    request = np.arange(8)[None] < 6                    # tokens 6, 7: not the request
    logits = rng.normal(size=(1, vocab)).astype(np.float32)
    first_ecg = s2cfg.ecg_token_ids[0]

    def decided(states, tokens):
        return np.asarray(model.apply({"params": params}, jnp.asarray(logits), jnp.asarray(states),
                                      jnp.asarray(tokens), jnp.asarray(request),
                                      method=UniECGStage2.decide_first_token))[0]

    words = np.arange(vocab) != first_ecg

    def p_ecg(states=hidden, tokens=ids):
        """The decision's log-odds: log p([ECG0]) - log p(not [ECG0])."""
        out = decided(states, tokens)
        return float(out[first_ecg] - jax.nn.logsumexp(out[words]))

    base = p_ecg()
    early_state, early_token, outside = hidden.copy(), ids.copy(), hidden.copy()
    early_state[0, 2] = rng.normal(size=width)
    early_token[0, 2] = 41
    outside[0, 7] = rng.normal(size=width)
    assert abs(p_ecg(early_state) - base) > 1e-4
    assert abs(p_ecg(tokens=early_token) - base) > 1e-4
    assert p_ecg(outside) == pytest.approx(base, abs=1e-5)
    out = decided(hidden, ids)
    np.testing.assert_array_equal(out[words], logits[0, words])
    # The decision is the read-out's alone: the LLM's own [ECG0] logit does not enter it.
    other_llm = logits.copy()
    other_llm[0, first_ecg] += 5.0
    assert float(jax.nn.softmax(decided(hidden, ids))[first_ecg]) == pytest.approx(
        float(jax.nn.softmax(np.asarray(model.apply(
            {"params": params}, jnp.asarray(other_llm), jnp.asarray(hidden), jnp.asarray(ids),
            jnp.asarray(request), method=UniECGStage2.decide_first_token))[0])[first_ecg]),
        rel=1e-5)


def test_old_stage2_configs_build_without_the_decision_read_out():
    """A config without `model.decision` (every checkpoint written before it) builds no read-out:
    no params, no decoding hook, and its first-token logits are the LLM's own."""
    from uniecg_jax.inference.chat import decision_hook
    from uniecg_jax.models.stage2 import UniECGStage2

    assert _stage2_config().model.decision.num_queries >= 1
    model, s2cfg, params = _decision_model(with_decision=False)
    assert s2cfg.decision is None and "decision" not in params and decision_hook(model) is None
    ids = jnp.asarray(np.arange(5, 15, dtype=np.int32)[None])
    plain = model.apply({"params": params}, ids, method=UniECGStage2.generate_outputs)[0]
    positioned = model.apply({"params": params}, ids, None, jnp.asarray([4]),
                             method=UniECGStage2.generate_outputs)[0]
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(positioned))
    new_model, _, new_params = _decision_model()
    assert decision_hook(new_model) is not None and "decision" in new_params
    decided = new_model.apply({"params": new_params}, ids, None, jnp.asarray([4]),
                              method=UniECGStage2.generate_outputs)[0]
    assert not np.allclose(np.asarray(decided[0, 4]), np.asarray(plain[0, 4]))
    np.testing.assert_array_equal(np.asarray(decided[0, 5:]), np.asarray(plain[0, 5:]))
