"""One model that interprets or generates: stage-2 UniECG + the diffusion model.

    model = UnifiedModel.load("/tmp/stage2", diffusion="/tmp/diffusion")
    turn = model.chat("Show me sinus tachycardia at 130 bpm in a 70-year-old woman",
                      out_dir="/tmp/gen")
    turn.text, turn.generated_ecg, turn.files       # [ECG] emitted -> ECG [12, T] + WFDB/PNG stems
    turn = model.chat("Interpret this ECG.", ecg=record.to_encoder_input())   # a report

The task is never chosen by a rule: the LLM decodes (greedy by default; with a decision read-out,
`model.decision`, the first token of a text-only request is drawn with p([ECG0]) from the read-out
over the whole request, `decision_hook`) keeping the final hidden states of the tokens it feeds
(`decoding.generate(..., return_hidden=True)`); if it emitted the
`[ECG]` tokens, their hidden states go through the alignment head to the condition vector and
through the attribute head to sex / age / heart rate (no second forward pass): the model read the
numbers the request states or implies, and they feed the diffusion model directly. Explicit
values (`chat(sex=..., age=..., heart_rate=...)`, `uniecg chat --sex/--age/--hr`) override them;
`parse_request=True` (`--conditions-from-text`) overrides them with what the regular expressions of
`parse_conditions` find in the text (the pre-attribute-head behaviour, kept as the measured
baseline and an explicit override). A stage-2 model without an attribute head (trained before it
existed) uses the defaults (M, 50 years, 70 bpm) unless overridden. The diffusion sampler draws the
ECG with the diffusion checkpoint's `sample.*` settings, written as WFDB + PNG.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from uniecg_jax.checkpoint import load_model_config, restore_model, tokenizer_path
from uniecg_jax.data.record import DIFFUSION_FS, UNKNOWN_AGE, UNKNOWN_HEART_RATE
from uniecg_jax.data.chat_format import InputBuilder, Turn
from uniecg_jax.data.conversations import request_prompt_ids
from uniecg_jax.data.tokenizer import load_tokenizer
from uniecg_jax.diffusion.ecg_writer import write_generated
from uniecg_jax.diffusion.pipeline import load_pipeline
from uniecg_jax.errors import CheckpointError
from uniecg_jax.inference import decoding
from uniecg_jax.inference.interpret import Interpreter, input_builder, resolve_model_dir
from uniecg_jax.models.llm import Decoder
from uniecg_jax.sharding import shardings_for
from uniecg_jax.models.stage2 import UniECGStage2, abstract_stage2_params, build_stage2, \
    stage1_model, stage1_params

DEFAULT_SEX = "M"
_AGE = re.compile(r"\b(\d{1,3})\s*-?\s*(?:years?|yrs?|y)\s*-?\s*old\b|\bage[sd]?\s*[:=]?\s*(\d{1,3})\b",
                  re.IGNORECASE)
_HEART_RATE = re.compile(r"\b(?:HR|heart\s+rate|rate)\s*(?:of|[:=~])?\s*(\d{2,3})\b"
                         r"|\b(\d{2,3})\s*(?:bpm|beats\s*(?:per|/)\s*min(?:ute)?|/\s*min)\b",
                         re.IGNORECASE)
_FEMALE = re.compile(r"\b(?:woman|female|girl|lady|she|her)\b|\bsex\s*[:=]\s*f\b", re.IGNORECASE)
_MALE = re.compile(r"\b(?:man|male|boy|gentleman|he|his)\b|\bsex\s*[:=]\s*m\b", re.IGNORECASE)


def parse_conditions(text: str) -> dict:
    """Sex ("M"/"F"), age (years) and heart rate (bpm) stated in a request, None where absent, by
    regular expressions: the explicit override `parse_request` and the baseline the attribute head
    is measured against (`demo.stage2`); not how `chat` reads a request by default.

    "60-year-old woman", "age 60", "HR 110", "heart rate of 110", "110 bpm", "male" / "female".
    """
    def first_number(pattern):
        match = pattern.search(text)
        return None if match is None else float(next(g for g in match.groups() if g))

    female, male = _FEMALE.search(text), _MALE.search(text)
    sex = None
    if female and (not male or female.start() <= male.start()):
        sex = "F"
    elif male:
        sex = "M"
    return {"sex": sex, "age": first_number(_AGE), "heart_rate": first_number(_HEART_RATE)}


def regex_conditions(text: str) -> dict:
    """`parse_conditions` with the defaults (M, 50 years, 70 bpm) where the text states nothing:
    how `chat` read a request before the attribute head (the baseline `eval` measures it by)."""
    stated = parse_conditions(text)
    defaults = {"sex": DEFAULT_SEX, "age": UNKNOWN_AGE, "heart_rate": UNKNOWN_HEART_RATE}
    return {name: defaults[name] if stated[name] is None else stated[name] for name in defaults}


def sample_settings(diffusion_config: Any = None, pipeline: Any = None) -> dict:
    """How `chat` samples: the diffusion checkpoint's `sample.*` (sampler, steps, guidance, eta,
    output_rate) where its config is known, else the `configs/diffusion.py` defaults with the
    pipeline's own `default_guidance`."""
    settings = dict(sampler="ddim", steps=50, eta=0.0, output_rate=DIFFUSION_FS,
                    guidance=getattr(pipeline, "default_guidance", 1.0))
    if diffusion_config is not None and "sample" in diffusion_config:
        settings.update({key: diffusion_config.sample[key] for key in settings
                         if key in diffusion_config.sample})
    return settings


def load_diffusion(diffusion) -> tuple[Any, dict | None]:
    """(DiffusionPipeline, sample settings) from a diffusion model dir / train workdir, a
    `(pipeline, config)` pair as `load_pipeline` returns it, or a pipeline alone; (None, None)
    for None."""
    if diffusion is None:
        return None, None
    if isinstance(diffusion, str):
        diffusion = load_pipeline(diffusion)
    pipeline, config = diffusion if isinstance(diffusion, tuple) else (diffusion, None)
    return pipeline, sample_settings(config, pipeline)


HEART_RATE_RANGE = (20.0, 300.0)   # what the diffusion model is asked for, bpm
AGE_RANGE = (0.0, 120.0)           # years (`diffusion.conditioning.build_condition` accepts these)


def conditions_from_attributes(attributes: dict, row: int = 0) -> dict:
    """The attribute head's outputs (`{"heart_rate", "age", "male_logit"}`, each [B]) -> row's
    {"sex": "M"/"F", "age": years, "heart_rate": bpm}, clipped to what the UNet accepts."""
    return {"sex": "M" if float(attributes["male_logit"][row]) > 0 else "F",
            "age": float(np.clip(attributes["age"][row], *AGE_RANGE)),
            "heart_rate": float(np.clip(attributes["heart_rate"][row], *HEART_RATE_RANGE))}


@dataclasses.dataclass
class ChatTurn:
    """One answer. `generated_ecg` [12, T] mV at `sample_rate` when the model emitted [ECG].
    `conditions`: what the diffusion model was given; `predicted_conditions`: what the attribute
    head read from the request (None without a head); `conditions_source`: per value, "model",
    "argument", "text" (parse_request) or "default"."""
    prompt: str
    text: str
    token_ids: list[int]
    emitted_ecg_tokens: bool
    condition: np.ndarray | None = None
    conditions: dict | None = None
    predicted_conditions: dict | None = None
    conditions_source: dict | None = None
    generated_ecg: np.ndarray | None = None
    sample_rate: float | None = None
    files: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class UnifiedModel:
    """Stage-2 model + params + tokenizer (+ an optional diffusion pipeline)."""
    model: UniECGStage2
    params: Any
    tokenizer: Any
    config: ml_collections.ConfigDict
    diffusion: Any = None
    sample: dict | None = None   # `sample_settings` of the diffusion model (chat's defaults)

    @classmethod
    def load(cls, path: str, diffusion=None, mesh=None) -> "UnifiedModel":
        """From a stage-2 train workdir or its exported model dir; `diffusion`: a diffusion model
        dir, a `(pipeline, config)` pair or a pipeline (optional: without it the model only
        interprets and emits tokens). `chat` samples with the diffusion config's `sample.*`.
        `mesh`: restore every parameter onto its sharding on that mesh (the rules table), so no
        host holds the whole model (export on a pod); default: one device."""
        directory = resolve_model_dir(path)
        config = load_model_config(directory)
        if "ecg_token_ids" not in config.model or "alignment" not in config.model:
            raise CheckpointError(f"{directory}: not a stage-2 model (no model.ecg_token_ids / "
                                  "model.alignment in config.json); train configs/stage2.py")
        model, _ = build_stage2(config.model)
        placement = (jax.sharding.SingleDeviceSharding(jax.devices()[0]) if mesh is None
                     else lambda boxed: shardings_for(boxed, mesh))
        params, _ = restore_model(directory, abstract_stage2_params(model, placement))
        tokenizer = load_tokenizer(tokenizer_path(directory),
                                   placeholder=model.config.unified.input.placeholder)
        return cls(model, params, tokenizer, config, *load_diffusion(diffusion))

    @property
    def ecg_token_ids(self) -> tuple[int, ...]:
        return self.model.config.ecg_token_ids

    def interpreter(self):
        """The stage-1 Interpreter on this model's tower + LLM (same params, same computation)."""
        if not hasattr(self, "_interpreter"):
            self._interpreter = Interpreter(stage1_model(self.model.config),
                                            stage1_params(self.params), self.tokenizer, self.config)
        return self._interpreter

    @property
    def inputs(self) -> InputBuilder:
        """The input builder of this model's training data (shared with its interpreter)."""
        return input_builder(self.tokenizer, self.config)

    def text_prompt_ids(self, prompt: str | Sequence[Turn]) -> list[int]:
        """A text-only request (or a conversation of (role, text) turns ending with the user's
        request), open for the answer: the ids a stage-2 training example holds before its
        answer (`data.conversations.request_prompt_ids`)."""
        if isinstance(prompt, str):
            return self.inputs.request_ids(prompt)
        return request_prompt_ids(self.inputs, prompt)

    def decode_text(self, token_ids: Sequence[int]) -> str:
        """Generated ids -> text without special tokens, [ECG] tokens or eos."""
        drop = set(self.ecg_token_ids) | {self.model.config.unified.llm.eos_token_id}
        return self.tokenizer.decode([t for t in token_ids if t not in drop],
                                     skip_special_tokens=True).strip()

    def respond(self, prompts: Sequence[str], ecgs: np.ndarray | None = None, *,
                max_new_tokens: int | None = None, sampling: decoding.Sampling | None = None,
                seed: int = 0, with_attributes: bool = False, images=None) -> tuple:
        """Decodes a batch; then the condition vectors of the rows that emitted [ECG] tokens.

        Args:
          prompts: B requests (text, or text-only conversations as (role, text) turns). ecgs:
            optional [B, 12, samples] (interpretation prompts then carry the `<ecg>` placeholder,
            as in stage 1). images: optional B ECG images (paths, RGB uint8 pages or pixels; a
            model with an image tower only), read as `Interpreter.model_inputs` reads them.
          with_attributes: also return the attribute head's outputs.
        Returns:
          (generated ids per row (eos excluded), condition [B, text_dim] f32, emitted [B] bool:
           True where all N [ECG] tokens were generated) and, with `with_attributes`, the
          attribute head's {"heart_rate", "age", "male_logit"} [B] f32 (None without a head).
        """
        sampling = sampling or decoding.Sampling()
        llm_cfg = self.model.config.unified.llm
        max_new = int(max_new_tokens or self.config.eval.max_new_tokens)
        rng = jax.random.PRNGKey(seed)
        if ecgs is None and images is None:
            ids, mask = decoding.left_pad([self.text_prompt_ids(p) for p in prompts],
                                          llm_cfg.pad_token_id)
            # With a decision read-out it decides the first token of a text-only request; a
            # request with an ECG is decided as in stage 1 (interpretation stays token-identical).
            hook = decision_hook(self.model)
            out = decoding.generate(Decoder(llm_cfg), self.params["llm"], ids, mask,
                                    max_new_tokens=max_new, sampling=sampling, rng=rng,
                                    return_hidden=True,
                                    first_token=None if hook is None else (hook, self.params))
        else:
            interpreter = self.interpreter()
            batch = interpreter.model_inputs(ecgs, images)
            ids, mask, slots = interpreter.build_inputs(list(prompts), batch.ecg_present,
                                                        batch.image_present)
            out = decoding.generate(Decoder(llm_cfg), self.params["llm"], ids, mask,
                                    max_new_tokens=max_new, sampling=sampling, rng=rng,
                                    extra_embeddings=interpreter.encode(batch),
                                    extra_positions=slots, return_hidden=True)
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        generated = [[t for t in tokens[row, :lengths[row]].tolist() if t != llm_cfg.eos_token_id]
                     for row in range(len(prompts))]
        # The decode pass's hidden states at the [ECG] tokens (prompt + answer, as in training).
        all_ids = np.concatenate([ids, tokens], axis=1)
        condition, valid = alignment_fn(self.model)(self.params, out.hidden, all_ids)
        emitted = np.asarray(valid).all(axis=1)
        if not with_attributes:
            return generated, np.asarray(condition, np.float32), emitted
        attributes = None
        if self.model.config.attributes is not None:
            attributes = {name: np.asarray(value, np.float32) for name, value in
                          attribute_fn(self.model)(self.params, out.hidden, all_ids).items()}
        return generated, np.asarray(condition, np.float32), emitted, attributes

    def chat(self, prompt: str, ecg: np.ndarray | None = None, *, image=None,
             out_dir: str | None = None,
             sex: str | None = None, age: float | None = None, heart_rate: float | None = None,
             max_new_tokens: int | None = None, steps: int | None = None, seed: int = 0,
             sample_rate: float | None = None, record_name: str = "generated",
             parse_request: bool = False) -> ChatTurn:
        """One request: interprets (text answer) or, when the model emits [ECG], generates an ECG
        (condition from the [ECG] hidden states; sex/age/HR from the arguments, else (with
        `parse_request`) the regular expressions on the request, else the attribute head, else
        the defaults) and writes `out_dir/{record_name}_000.{hea,dat,png}` when out_dir is given.
        The diffusion model samples with its checkpoint's `sample.*` (sampler, steps, guidance,
        eta, output rate); `steps` / `sample_rate` override those two."""
        ecgs = None if ecg is None else np.asarray(ecg, np.float32)[None]
        generated, condition, emitted, attributes = self.respond(
            [prompt], ecgs, max_new_tokens=max_new_tokens, seed=seed, with_attributes=True,
            images=None if image is None else [image])
        turn = ChatTurn(prompt, self.decode_text(generated[0]), generated[0], bool(emitted[0]))
        if not turn.emitted_ecg_tokens:
            return turn
        turn.condition = condition[0]
        if attributes is not None:
            turn.predicted_conditions = conditions_from_attributes(attributes)
        layers = [("argument", {"sex": sex, "age": age, "heart_rate": heart_rate}),
                  ("text", parse_conditions(prompt) if parse_request else {}),
                  ("model", turn.predicted_conditions or {}),
                  ("default", {"sex": DEFAULT_SEX, "age": UNKNOWN_AGE,
                               "heart_rate": UNKNOWN_HEART_RATE})]
        turn.conditions, turn.conditions_source = {}, {}
        for name in ("sex", "age", "heart_rate"):
            source, value = next((source, values[name]) for source, values in layers
                                 if values.get(name) is not None)
            turn.conditions[name] = value if name == "sex" else float(value)
            turn.conditions_source[name] = source
        if self.diffusion is None:
            turn.text = turn.text or "[ECG tokens emitted; no diffusion model loaded]"
            return turn
        settings = self.sample or sample_settings(pipeline=self.diffusion)
        turn.sample_rate = float(sample_rate or settings["output_rate"])
        turn.generated_ecg = self.diffusion.generate(
            turn.condition, turn.conditions["sex"], turn.conditions["age"],
            turn.conditions["heart_rate"], n=1, sampler=str(settings["sampler"]),
            steps=int(steps or settings["steps"]), guidance=float(settings["guidance"]),
            eta=float(settings["eta"]), seed=seed, sample_rate=turn.sample_rate)[0]
        if out_dir:
            comments = [f"prompt: {prompt}", "sex: {sex} age: {age:g} hr: {heart_rate:g}".format(
                **turn.conditions) + " (from {sex}/{age}/{heart_rate})".format(
                **turn.conditions_source)]
            turn.files = write_generated(turn.generated_ecg[None], out_dir, turn.sample_rate,
                                         prefix=record_name, comments=comments)
        return turn


_ALIGNMENT: dict = {}


def alignment_fn(model: UniECGStage2):
    """Jitted `(params, hidden [B, T, D], ids [B, T]) -> (condition [B, text_dim], valid [B, N])`:
    the alignment head on the hidden states at the `[ECG]` tokens."""
    if model.config not in _ALIGNMENT:
        _ALIGNMENT[model.config] = jax.jit(lambda params, hidden, ids: model.apply(
            {"params": params}, hidden, ids, method=UniECGStage2.align))
    return _ALIGNMENT[model.config]


_ATTRIBUTES: dict = {}
_DECISION: dict = {}


def decision_hook(model: UniECGStage2):
    """`(params, prompt hidden [B, T, D], ids [B, T], mask [B, T], logits [B, V]) -> [B, V]`: the
    first answer token's logits with the decision read-out's verdict
    (`UniECGStage2.decide_first_token` over the prompt's real tokens), for `decoding.generate`'s
    `first_token`; None for a model without a read-out (`model.decision` unset). One function
    per model config, so the decoder compiles once."""
    if model.config.decision is None:
        return None
    if model.config not in _DECISION:
        _DECISION[model.config] = lambda params, hidden, ids, mask, logits: model.apply(
            {"params": params}, logits, hidden, ids, mask > 0,
            method=UniECGStage2.decide_first_token)
    return _DECISION[model.config]


def attribute_fn(model: UniECGStage2):
    """Jitted `(params, hidden [B, T, D], ids [B, T]) -> {"heart_rate", "age", "male_logit"}`
    ([B] each): the attribute head, the hidden states at the `[ECG]` tokens reading the request's."""
    if model.config not in _ATTRIBUTES:
        _ATTRIBUTES[model.config] = jax.jit(lambda params, hidden, ids: model.apply(
            {"params": params}, hidden, ids, method=UniECGStage2.attributes_of))
    return _ATTRIBUTES[model.config]
