"""One model that interprets or generates: stage-2 UniECG + the diffusion model.

    model = UnifiedModel.load("/tmp/stage2", diffusion="/tmp/diffusion")
    turn = model.chat("Generate a 12-lead ECG that matches this report: sinus tachycardia. "
                      "60-year-old woman, HR 110", out_dir="/tmp/gen")
    turn.text, turn.generated_ecg, turn.files       # [ECG] emitted -> ECG [12, T] + WFDB/PNG stems
    turn = model.chat("Interpret this ECG.", ecg=record.to_encoder_input())   # a report

The task is never chosen by a rule: the LLM decodes (greedy by default) keeping the final hidden
states of the tokens it feeds (`decoding.generate(..., return_hidden=True)`); if it emitted the
`[ECG]` tokens, their hidden states go through the alignment head to the condition vector (no
second forward pass), sex / age / heart rate are read from the request text (`parse_conditions`,
overridable) and the diffusion sampler draws the ECG with the diffusion checkpoint's `sample.*`
settings, written as WFDB + PNG.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from uniecg_jax.checkpoint import load_model_config, restore_model, tokenizer_path
from uniecg_jax.data.record import DIFFUSION_FS, UNKNOWN_AGE, UNKNOWN_HEART_RATE
from uniecg_jax.data.chat_format import InputBuilder
from uniecg_jax.data.tokenizer import load_tokenizer
from uniecg_jax.diffusion.ecg_writer import write_generated
from uniecg_jax.diffusion.pipeline import load_pipeline
from uniecg_jax.errors import CheckpointError
from uniecg_jax.inference import decoding
from uniecg_jax.inference.interpret import Interpreter, encode_ecg_fn, input_builder, \
    resolve_model_dir
from uniecg_jax.models.llm import Decoder
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
    """Sex ("M"/"F"), age (years) and heart rate (bpm) stated in a request, None where absent.

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


@dataclasses.dataclass
class ChatTurn:
    """One answer. `generated_ecg` [12, T] mV at `sample_rate` when the model emitted [ECG]."""
    prompt: str
    text: str
    token_ids: list[int]
    emitted_ecg_tokens: bool
    condition: np.ndarray | None = None
    conditions: dict | None = None
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
    def load(cls, path: str, diffusion=None) -> "UnifiedModel":
        """From a stage-2 train workdir or its exported model dir; `diffusion`: a diffusion model
        dir, a `(pipeline, config)` pair or a pipeline (optional: without it the model only
        interprets and emits tokens). `chat` samples with the diffusion config's `sample.*`."""
        directory = resolve_model_dir(path)
        config = load_model_config(directory)
        if "ecg_token_ids" not in config.model or "alignment" not in config.model:
            raise CheckpointError(f"{directory}: not a stage-2 model (no model.ecg_token_ids / "
                                  "model.alignment in config.json); train configs/stage2.py")
        model, _ = build_stage2(config.model)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        params, _ = restore_model(directory, abstract_stage2_params(model, device))
        tokenizer = load_tokenizer(tokenizer_path(directory))
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

    def text_prompt_ids(self, prompt: str) -> list[int]:
        """A text-only request, open for the answer: the ids a stage-2 training example holds
        before its `[ECG]` tokens (`InputBuilder.generation_example`)."""
        return self.inputs.request_ids(prompt)

    def decode_text(self, token_ids: Sequence[int]) -> str:
        """Generated ids -> text without special tokens, [ECG] tokens or eos."""
        drop = set(self.ecg_token_ids) | {self.model.config.unified.llm.eos_token_id}
        return self.tokenizer.decode([t for t in token_ids if t not in drop],
                                     skip_special_tokens=True).strip()

    def respond(self, prompts: Sequence[str], ecgs: np.ndarray | None = None, *,
                max_new_tokens: int | None = None, sampling: decoding.Sampling | None = None,
                seed: int = 0) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
        """Decodes a batch; then the condition vectors of the rows that emitted [ECG] tokens.

        Args:
          prompts: B requests. ecgs: optional [B, 12, samples] (interpretation prompts then carry
            the `<ecg>` placeholder, as in stage 1).
        Returns:
          (generated ids per row (eos excluded), condition [B, text_dim] f32, emitted [B] bool:
           True where all N [ECG] tokens were generated).
        """
        sampling = sampling or decoding.Sampling()
        llm_cfg = self.model.config.unified.llm
        max_new = int(max_new_tokens or self.config.eval.max_new_tokens)
        rng = jax.random.PRNGKey(seed)
        if ecgs is None:
            ids, mask = decoding.left_pad([self.text_prompt_ids(p) for p in prompts],
                                          llm_cfg.pad_token_id)
            out = decoding.generate(Decoder(llm_cfg), self.params["llm"], ids, mask,
                                    max_new_tokens=max_new, sampling=sampling, rng=rng,
                                    return_hidden=True)
        else:
            interpreter = self.interpreter()
            ids, mask, slots = interpreter.build_inputs(list(prompts))
            ecg_tokens = encode_ecg_fn(interpreter.model)(interpreter.params,
                                                          jnp.asarray(ecgs, jnp.float32))
            out = decoding.generate(Decoder(llm_cfg), self.params["llm"], ids, mask,
                                    max_new_tokens=max_new, sampling=sampling, rng=rng,
                                    extra_embeddings=ecg_tokens, extra_positions=slots,
                                    return_hidden=True)
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        generated = [[t for t in tokens[row, :lengths[row]].tolist() if t != llm_cfg.eos_token_id]
                     for row in range(len(prompts))]
        # The decode pass's hidden states at the [ECG] tokens (prompt + answer, as in training).
        condition, valid = alignment_fn(self.model)(self.params, out.hidden,
                                                 np.concatenate([ids, tokens], axis=1))
        emitted = np.asarray(valid).all(axis=1)
        return generated, np.asarray(condition, np.float32), emitted

    def chat(self, prompt: str, ecg: np.ndarray | None = None, *, out_dir: str | None = None,
             sex: str | None = None, age: float | None = None, heart_rate: float | None = None,
             max_new_tokens: int | None = None, steps: int | None = None, seed: int = 0,
             sample_rate: float | None = None, record_name: str = "generated") -> ChatTurn:
        """One request: interprets (text answer) or, when the model emits [ECG], generates an ECG
        (condition from the [ECG] hidden states; sex/age/HR from the flags, else the request,
        else defaults) and writes `out_dir/{record_name}_000.{hea,dat,png}` when out_dir is given.
        The diffusion model samples with its checkpoint's `sample.*` (sampler, steps, guidance,
        eta, output rate); `steps` / `sample_rate` override those two."""
        ecgs = None if ecg is None else np.asarray(ecg, np.float32)[None]
        generated, condition, emitted = self.respond([prompt], ecgs, max_new_tokens=max_new_tokens,
                                                     seed=seed)
        turn = ChatTurn(prompt, self.decode_text(generated[0]), generated[0], bool(emitted[0]))
        if not turn.emitted_ecg_tokens:
            return turn
        stated = parse_conditions(prompt)
        turn.condition = condition[0]
        turn.conditions = {
            "sex": sex or stated["sex"] or DEFAULT_SEX,
            "age": float(age if age is not None else stated["age"] or UNKNOWN_AGE),
            "heart_rate": float(heart_rate if heart_rate is not None
                                else stated["heart_rate"] or UNKNOWN_HEART_RATE)}
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
                **turn.conditions)]
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
