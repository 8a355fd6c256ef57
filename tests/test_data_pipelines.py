"""grain pipelines: per-host shards disjoint and covering, deterministic shuffling, exact iterator
restore, the three pipelines' outputs against their inputs, global sharded batches, reading
data_prep shards; and the tiny tokenizer."""
import dataclasses

import numpy as np
import pytest

from data_prep.prep import PrepOptions, run_prep
from data_prep.sources import SourceOptions
from uniecg_jax.data import load_bundled_records, pipelines, tokenizer as tok
from uniecg_jax.data.chat_format import InputBuilder
from uniecg_jax.data.conversations import TRAINED_REQUESTS, ECGFindings, evidence_answer
from uniecg_jax.data.text_encoder import HashingTextEncoder
from uniecg_jax.errors import UniECGError

NUM_RECORDS = 12


@pytest.fixture(scope="module")
def records():
    return load_bundled_records()[:NUM_RECORDS]


@pytest.fixture(scope="module")
def source(records):
    return pipelines.records_source(records, text_encoder=HashingTextEncoder(16),
                                    conversations="build")


def _keys(loader):
    return [int(k) for batch in loader for k in batch["record_key"]]


def test_tiny_tokenizer_vocab_specials_and_chat_format():
    tokenizer = tok.load_tiny()
    assert len(tokenizer) == 512  # == presets.llm("tiny").vocab_size
    from uniecg_jax.models.presets import llm
    preset = llm("tiny")
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        preset.pad_token_id, preset.bos_token_id, preset.eos_token_id)
    inputs = InputBuilder(tokenizer)
    assert inputs.placeholder_id == 4
    ids, mask = inputs.conversation([("user", "<image>\nWhat rhythm?"), ("assistant", "sinus rhythm."),
                                     ("user", "Rate?"), ("assistant", "72 bpm.")])
    assert tokenizer.decode(ids) == ("<s>USER: <ecg>\nWhat rhythm? ASSISTANT: sinus rhythm.</s>"
                                     "USER: Rate? ASSISTANT: 72 bpm.</s>")
    trained = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    # Whole-string tokenization: the space after "ASSISTANT:" belongs to the answer's first token.
    assert trained == " sinus rhythm.</s> 72 bpm.</s>"
    # Served prompts are prefixes of the training ids: interpretation stops at "ASSISTANT:"
    # (GEM's generation prompt), a generation request keeps the whole assistant prefix.
    prompt = inputs.prompt_ids("Hi", with_ecg=True)
    assert tokenizer.decode(prompt) == "<s>USER: <ecg>\nHi ASSISTANT:"
    example, _ = inputs.conversation([("user", "Hi"), ("assistant", "sinus rhythm.")])
    assert example[:len(prompt)] == prompt
    request = inputs.request_ids("Hi")
    assert tokenizer.decode(request) == "<s>USER: Hi ASSISTANT: "
    ecg_ids = tok.add_ecg_tokens(tokenizer, 4)
    assert ecg_ids == [512, 513, 514, 515] and tok.add_ecg_tokens(tokenizer, 4) == ecg_ids
    assert len(tokenizer) == 516
    assert tokenizer.convert_ids_to_tokens(ecg_ids) == ["[ECG0]", "[ECG1]", "[ECG2]", "[ECG3]"]
    assert inputs.ecg_token_ids(4) == ecg_ids


@pytest.mark.parametrize("process_count", [2, 3])
def test_host_shards_are_disjoint_and_cover_the_data(source, process_count):
    per_host = [_keys(pipelines.stage2_loader(source, batch_size=1, process_index=i,
                                              process_count=process_count, num_epochs=1, seed=3))
                for i in range(process_count)]
    everything = set(_keys(pipelines.stage2_loader(source, batch_size=1, process_index=0,
                                                   process_count=1, num_epochs=1)))
    assert len(everything) == NUM_RECORDS
    for i in range(process_count):
        for j in range(i + 1, process_count):
            assert not set(per_host[i]) & set(per_host[j])
    # drop_remainder sharding gives every host the same count; the union is all but < hosts records.
    assert len({len(keys) for keys in per_host}) == 1
    union = set().union(*per_host)
    assert union <= everything and len(everything) - len(union) < process_count


def test_shuffle_is_deterministic_by_seed_and_differs_by_epoch(source):
    def order(seed):
        return _keys(pipelines.stage2_loader(source, batch_size=1, num_epochs=2, seed=seed,
                                             process_index=0, process_count=1))
    first, again, other = order(0), order(0), order(1)
    assert first == again and first != other
    epoch_one, epoch_two = first[:NUM_RECORDS], first[NUM_RECORDS:]
    assert sorted(epoch_one) == sorted(epoch_two) and epoch_one != epoch_two


def test_iterator_restore_continues_exactly(source):
    def loader():
        return pipelines.stage1_loader(source, batch_size=2, max_length=192, seed=5,
                                       process_index=1, process_count=2)
    iterator = iter(loader())
    for _ in range(4):  # 6 records per host -> crosses an epoch boundary
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]
    restored = iter(loader())
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        assert set(got) == set(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_stage1_tokens_placeholder_and_loss_mask(source, records):
    tokenizer = tok.load_tiny()
    batch = next(iter(pipelines.stage1_loader(source, tokenizer, batch_size=4, max_length=192,
                                              shuffle=False, process_index=0, process_count=1)))
    assert batch["input_ids"].shape == (4, 192) and batch["ecg"].shape == (4, 12, 5000)
    for row in range(4):
        ids = batch["input_ids"][row]
        placeholder = InputBuilder(tokenizer).placeholder_id
        assert (ids == placeholder).sum() == 1 and ids[batch["ecg_position"][row]] == placeholder
        np.testing.assert_array_equal(batch["ecg"][row], records[row].to_encoder_input())
        length = batch["attention_mask"][row].sum()
        assert (ids[length:] == tokenizer.pad_token_id).all() and (batch["loss_mask"][row][length:] == 0).all()
        answer = tokenizer.decode(ids[batch["loss_mask"][row] == 1])
        assert answer.startswith(" Rhythm and rate:") and answer.endswith("</s>")
        assert "USER:" not in answer and "ASSISTANT" not in answer


def test_stage2_ecg_tokens_and_embeddings(source, records):
    tokenizer = tok.load_tiny()
    with pytest.raises(UniECGError, match="add_ecg_tokens"):   # never grown behind our back
        pipelines.stage2_loader(source, tokenizer, num_ecg_tokens=4)
    assert len(tokenizer) == 512
    ecg_ids = tok.add_ecg_tokens(tokenizer, 4)
    batch = next(iter(pipelines.stage2_loader(source, tokenizer, num_ecg_tokens=4, max_length=40,
                                              batch_size=3, shuffle=False, process_index=0,
                                              process_count=1)))
    assert len(tokenizer) == 516
    embeddings = HashingTextEncoder(16).encode([r.report for r in records[:3]])
    np.testing.assert_array_equal(batch["text_embedding"], embeddings)
    for row in range(3):
        ids, positions = batch["input_ids"][row], batch["ecg_token_positions"][row]
        assert ids[positions].tolist() == ecg_ids
        assert ids[positions[-1] + 1] == tokenizer.eos_token_id
        assert np.flatnonzero(batch["loss_mask"][row]).tolist() == list(positions) + [positions[-1] + 1]
        text = tokenizer.decode(ids[: positions[0]])
        # A request drawn from the trained phrasings (data.conversations; the ids before the
        # [ECG] tokens equal the served prompt: tests/test_stage2.py); a request too long for
        # max_length loses tokens before its end (which states the attributes), after its start.
        assert text.startswith("<s>USER: ") and text.endswith(" ASSISTANT: ")
        request = text[len("<s>USER: "):-len(" ASSISTANT: ")]
        assert any(template[0] == request[0] for template in TRAINED_REQUESTS), text
    with pytest.raises(UniECGError, match="no text embedding"):
        unembedded = pipelines.records_source(records[:2])
        next(iter(pipelines.stage2_loader(unembedded, batch_size=1, process_index=0,
                                          process_count=1)))


def test_diffusion_example_conditions(source, records):
    batch = next(iter(pipelines.diffusion_loader(source, batch_size=4, shuffle=False,
                                                 process_index=0, process_count=1)))
    assert batch["signal"].shape == (4, 12, 1024)
    for row in range(4):
        np.testing.assert_allclose(batch["signal"][row], records[row].to_diffusion_input())
        assert batch["sex"][row] == {"M": 1.0, "F": 0.0}[records[row].sex]
        assert batch["age"][row] == records[row].age
    # Bundled records carry no heart rate: it is measured (E07500 is sinus bradycardia).
    assert 50 < batch["heart_rate"][0] < 60
    np.testing.assert_array_equal(batch["condition_known"], np.ones((4, 3)))


def test_global_sharded_batches_on_8_devices(source):
    import jax
    from uniecg_jax.sharding import make_mesh

    mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    host = pipelines.stage2_loader(source, batch_size=8, shuffle=False, process_index=0,
                                   process_count=1)
    expected = next(iter(host))
    iterator = pipelines.global_batches(iter(host), mesh)
    batch = next(iterator)
    assert isinstance(batch["input_ids"], jax.Array)
    assert batch["input_ids"].sharding.spec[0] == ("data", "fsdp")
    assert len(batch["input_ids"].addressable_shards) == 8
    assert batch["input_ids"].addressable_shards[0].data.shape == (1, 128)
    np.testing.assert_array_equal(np.asarray(batch["input_ids"]), expected["input_ids"])
    assert iterator.get_state() is not None


def test_loaders_read_data_prep_shards(tmp_path):
    run_prep(PrepOptions(SourceOptions(source="cinc", root="bundled", build_conversations=False),
                         out_dir=str(tmp_path), workers=1, shard_size=16,
                         text_encoder="hash:16", progress=False))
    loader = pipelines.stage2_loader(str(tmp_path), batch_size=4, num_epochs=1, process_index=0,
                                     process_count=1)
    keys = _keys(loader)
    from uniecg_jax.data.examples import read_summary
    train = read_summary(tmp_path)["num_records"]["train"]
    assert len(keys) == train - train % 4 and len(set(keys)) == len(keys)
    batch = next(iter(pipelines.diffusion_loader(str(tmp_path), split="validation", batch_size=2,
                                                 process_index=0, process_count=1)))
    assert batch["text_embedding"].shape == (2, 16)
    with pytest.raises(UniECGError, match="unknown split"):
        pipelines.diffusion_loader(str(tmp_path), split="dev", batch_size=2)


def test_load_tokenizer_adds_the_placeholder_keeping_the_checkpoints_special_tokens(tmp_path):
    transformers = pytest.importorskip("transformers")
    from uniecg_jax.convert import hf_testing

    hf_testing.tiny_tokenizer(tmp_path, vocab_size=96)
    original = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    original.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    original.save_pretrained(str(tmp_path))
    tokenizer = tok.load_tokenizer(str(tmp_path))
    placeholder = InputBuilder(tokenizer).placeholder_id
    assert placeholder == 97 and len(tokenizer) == 98
    assert "<|im_start|>" in tokenizer.all_special_tokens   # add_special_tokens would drop it
    assert tokenizer.decode([5, placeholder], skip_special_tokens=True) == "w5"
    assert tok.load_tokenizer(str(tmp_path)).convert_tokens_to_ids("<ecg>") == placeholder


@pytest.mark.parametrize("lead_i, avf, lead_ii, axis", [
    (0.5, 0.3, 0.8, "normal"),
    (0.6, -0.2, 0.3, "normal"),                  # 0 to -30 degrees: physiological, not LAD
    (0.6, -0.5, -0.2, "left axis deviation"),    # beyond -30 degrees: II turns negative
    (-0.4, 0.6, 0.3, "right axis deviation"),
    (-0.4, -0.6, -0.3, "extreme axis deviation"),
])
def test_grounded_axis_uses_lead_ii_in_the_leftward_quadrant(records, lead_i, avf, lead_ii, axis):
    """The answer states left axis deviation (a scored diagnosis statement) only beyond -30
    degrees, and cites lead II as its evidence exactly when lead II decides."""
    findings = ECGFindings(beats=10, heart_rate_bpm=60.0, mean_rr_ms=1000.0, rr_std_ms=10.0,
                           qrs_net_lead_i_mv=lead_i, qrs_net_avf_mv=avf,
                           limb_peak_to_peak_mv=1.0, qrs_net_lead_ii_mv=lead_ii)
    assert findings.axis == axis
    answer = evidence_answer(records[0], findings)
    assert f"so the frontal QRS axis is {axis}." in answer
    assert ("in lead II (" in answer) == (lead_i > 0 >= avf)


def test_grounded_axis_is_not_read_from_inconsistent_limb_leads(records):
    """Recorded limb leads satisfy Einthoven's law and get an axis; neurokit2's synthetic leads
    (II != I + III) would give a spurious "left axis deviation", so their answer states none."""
    from uniecg_jax.data.conversations import measure_findings
    from uniecg_jax.data.record import LEADS
    real = measure_findings(records[0])
    assert real.limb_leads_consistent
    signal = records[0].signal.copy()
    signal[LEADS.index("III")] = signal[LEADS.index("I")]       # II - I - III = II - 2 I
    broken = dataclasses.replace(records[0], signal=signal)
    findings = measure_findings(broken)
    assert not findings.limb_leads_consistent
    answer = evidence_answer(broken, findings)
    assert "Axis: not assessed" in answer and "deviation" not in answer
