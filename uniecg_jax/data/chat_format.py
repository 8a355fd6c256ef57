"""The chat formats, the ECG placeholder, the `[ECG{i}]` generation tokens, and `InputBuilder`:
the one object that turns conversations and requests into token ids and masks, for the training
examples (`data.pipelines.Stage1Example`, `Stage2Example`) and for serving
(`inference.interpret.Interpreter`, `inference.chat.UnifiedModel`) alike, so the two cannot drift.

Both formats are LLaVA's `SeparatorStyle.TWO` (llava/conversation.py `get_prompt`, separators " "
after the system text and each user turn, the tokenizer's eos `</s>` after each answer):
    [system + " "] + "USER: <ph>\n{q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>"
  - `VICUNA` (`model.input.prompt_format = "vicuna"`): the project's own, no system text unless
    `data.system` sets one; the placeholder is the `<ecg>` token.
  - `LLAVA_V1` ("llava_v1"): LLaVA's `conv_llava_v1`, what GEM trains (`--version llava_v1`) and
    serves (`--conv-mode llava_v1`) with, token for token: its system text, `<image>` moved to the
    front of the first user turn.

Tokenization is LLaVA's `tokenizer_image_token` (llava/mm_utils.py): the WHOLE string is tokenized
at once, split only at the placeholder, whose slot holds the placeholder id (the `<ecg>` token, or
the sentinel -200 = LLaVA's IMAGE_TOKEN_INDEX with `placeholder="sentinel"`, which needs no
vocabulary row). The supervised-token mask is LLaVA's `preprocess_v1` (llava/train/train.py): per
round, everything up to and including "ASSISTANT: " is masked, the answer and its `</s>` trained.

Two open prompts:
  - `prompt_ids` (interpretation, stage 1): ends with "ASSISTANT:" (no space), LLaVA's generation
    prompt (`ret += role + ":"` for the open turn); whole-string tokenization merges the space into
    the first answer token in training, so the served prompt is a prefix of the training ids.
  - `request_ids` (generation, stage 2): ends with " ASSISTANT: ", exactly the ids a stage-2
    training example holds before its `[ECG]` tokens.

    builder = InputBuilder(tokenizer)                              # or prompt_format="llava_v1"
    builder.prompt_ids("Interpret this ECG.", with_ecg=True)      # serving: interpretation
    builder.request_ids(GENERATION_REQUEST + report)               # serving: generation request
    builder.interpretation_example(turns, max_length=256)          # training: stage 1 fields
    builder.generation_example(report, ecg_token_ids, max_length)  # training: stage 2 fields
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from uniecg_jax.errors import UniECGError

ECG_PLACEHOLDER = "<ecg>"
# LLaVA's image marker and the id its placeholder gets (llava/constants.py DEFAULT_IMAGE_TOKEN,
# IMAGE_TOKEN_INDEX): a negative id no embedding row holds, replaced by the ECG tokens.
IMAGE_MARKER = "<image>"
SENTINEL_PLACEHOLDER_ID = -200
GENERATION_REQUEST = "Generate a 12-lead ECG that matches this report: "
# The default interpretation prompt: the first of the grounded conversations' questions.
INTERPRETATION_REQUEST = "Interpret this 12-lead ECG and give the evidence for your diagnosis."
Turn = tuple[str, str | None]   # (role, text); text None = open for the answer


def ecg_token_names(count: int) -> list[str]:
    """`[ECG0]..[ECG{count-1}]`: the stage-2 generation tokens, in order."""
    return [f"[ECG{i}]" for i in range(count)]


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A `SeparatorStyle.TWO` conversation format (the answer separator is the tokenizer's eos).

    system: the format's own system text (None: none unless the builder is given one).
    separator: after the system text and after each user turn (LLaVA `sep`).
    marker: where the ECG placeholder stands in the text; `ecg_separator` follows it.
    ignored_markers: image/ECG markers removed from user text (the placeholder is placed here).
    """
    name: str
    system: str | None = None
    user_role: str = "USER"
    assistant_role: str = "ASSISTANT"
    separator: str = " "
    marker: str = ECG_PLACEHOLDER
    ecg_separator: str = "\n"
    ignored_markers: tuple[str, ...] = (IMAGE_MARKER, ECG_PLACEHOLDER)

    @property
    def user_prefix(self) -> str:
        return f"{self.user_role}: "

    @property
    def assistant_prefix(self) -> str:
        return f"{self.separator}{self.assistant_role}: "


VICUNA = ChatTemplate("vicuna")
# llava/conversation.py conv_llava_v1 (GEM commit c8a580f = LLaVA's).
LLAVA_V1 = ChatTemplate(
    "llava_v1", marker=IMAGE_MARKER,
    system="A chat between a curious human and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the human's questions.")
TEMPLATES = {template.name: template for template in (VICUNA, LLAVA_V1)}


def template_named(name: str) -> ChatTemplate:
    """The `ChatTemplate` of `model.input.prompt_format`."""
    if name not in TEMPLATES:
        raise UniECGError(f"unknown prompt format {name!r}; choose from {sorted(TEMPLATES)}")
    return TEMPLATES[name]


@dataclasses.dataclass(frozen=True, eq=False)
class InputBuilder:
    """Token ids, loss masks and ECG positions for every model input, in one format.

    tokenizer: any HF fast tokenizer; with placeholder "token" it must hold `<ecg>`
      (`data.tokenizer.load_tokenizer`); it is never modified here (grow it once with
      `data.tokenizer.add_ecg_tokens`).
    template: the chat format (`VICUNA`, `LLAVA_V1`; `for_model` picks the model's).
    system: a system prompt; None = the template's own (none for `VICUNA`).
    placeholder: "token" (`<ecg>`'s id) or "sentinel" (`SENTINEL_PLACEHOLDER_ID`).
    """
    tokenizer: Any
    template: ChatTemplate = VICUNA
    system: str | None = None
    placeholder: str = "token"

    @classmethod
    def for_model(cls, tokenizer, input_config: Any, system: str | None = None) -> "InputBuilder":
        """The builder of a model's `model.input` group (an `InputFormatConfig` or mapping with
        prompt_format / placeholder); `system` overrides the format's own system text."""
        get = (input_config.get if hasattr(input_config, "get")
               else lambda key, default: getattr(input_config, key, default))
        return cls(tokenizer, template_named(get("prompt_format", "vicuna")), system or None,
                   get("placeholder", "token"))

    def __post_init__(self):
        if self.placeholder not in ("token", "sentinel"):
            raise UniECGError(f"placeholder must be 'token' or 'sentinel', got {self.placeholder!r}")

    @property
    def placeholder_id(self) -> int:
        if self.placeholder == "sentinel":
            return SENTINEL_PLACEHOLDER_ID
        token_id = self.tokenizer.convert_tokens_to_ids(ECG_PLACEHOLDER)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {ECG_PLACEHOLDER} token; load it with "
                             "data.tokenizer.load_tokenizer()")
        return int(token_id)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def system_text(self) -> str | None:
        return self.system if self.system is not None else self.template.system

    def ecg_token_ids(self, count: int) -> list[int]:
        """Ids of `[ECG0]..[ECG{count-1}]`; raises if the tokenizer was not grown with them."""
        vocab = self.tokenizer.get_vocab()
        missing = [name for name in ecg_token_names(count) if name not in vocab]
        if missing:
            raise UniECGError(f"tokenizer lacks {missing[0]}..: add the [ECG] tokens once with "
                              "data.tokenizer.add_ecg_tokens(tokenizer, count)")
        return [int(vocab[name]) for name in ecg_token_names(count)]

    # ------------------------------------------------------------------ text and tokenization
    def text(self, turns: Sequence[Turn], with_ecg: bool = True) -> str:
        """The conversation string (LLaVA `Conversation.get_prompt` for SeparatorStyle.TWO).

        turns: [(role, text)] alternating "user"/"assistant", starting with "user". A final
          ("assistant", None) leaves the prompt open: "ASSISTANT:" without the trailing space.
        with_ecg: the placeholder marker + `ecg_separator` in front of the first user text
          (markers anywhere in user text are removed first, as LLaVA's preprocess_multimodal).
        """
        template, end = self.template, self.tokenizer.eos_token
        out = self.system_text + template.separator if self.system_text else ""
        for index, (role, text) in enumerate(turns):
            if role == "user":
                text = text or ""
                for marker in template.ignored_markers:
                    text = text.replace(marker, "")
                text = text.strip()
                if index == 0 and with_ecg:
                    text = template.marker + template.ecg_separator + text
                out += template.user_prefix + text
            elif role == "assistant":
                if text is None:
                    out += template.separator + template.assistant_role + ":"
                else:
                    out += template.assistant_prefix + text.strip() + end
            else:
                raise ValueError(f"unknown role {role!r} in turn {index}")
        return out

    def encode(self, text: str) -> list[int]:
        """bos + the whole string tokenized at once. With an `<ecg>` token in the text (the
        project's format) that is literally one call; otherwise LLaVA's `tokenizer_image_token`:
        split only at the placeholder marker, whose slot gets `placeholder_id`."""
        return self._encode_with_spans(text)[0]

    def _encode_with_spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode` and each token's character span in `text` ((0, 0) for bos)."""
        ids = [] if self.tokenizer.bos_token_id is None else [int(self.tokenizer.bos_token_id)]
        spans = [(0, 0)] * len(ids)
        if self.placeholder == "token" and self.template.marker == ECG_PLACEHOLDER:
            chunks, marker = [text], ""
        else:
            chunks, marker = text.split(self.template.marker), self.template.marker
        start = 0
        for index, chunk in enumerate(chunks):
            if index:
                ids.append(self.placeholder_id)
                spans.append((start, start + len(marker)))
                start += len(marker)
            if chunk:
                encoded = self.tokenizer(chunk, add_special_tokens=False,
                                         return_offsets_mapping=True)
                ids.extend(encoded["input_ids"])
                spans.extend((start + a, start + b) for a, b in encoded["offset_mapping"])
            start += len(chunk)
        return ids, spans

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def conversation(self, turns: Sequence[Turn], with_ecg: bool = True
                     ) -> tuple[list[int], list[int]]:
        """Tokenizes a conversation (see `text`).

        Returns (token ids [L], loss mask [L]: 1 on the assistant answers and their eos). The mask
        is what LLaVA's `preprocess_v1` trains: each answer from the space after "ASSISTANT:"
        (whichever token holds it: merged into the answer's first word, or alone before a digit)
        through its eos. preprocess_v1 finds those tokens by counting the tokens of each round
        tokenized apart; we find them by their character spans in the one tokenized string, which
        gives the same mask wherever LLaVA's counts add up (where they do not, LLaVA drops the
        example with "tokenization mismatch"; a tokenizer whose words merge differently after
        `</s>` does that).
        """
        text = self.text(turns, with_ecg)
        ids, spans = self._encode_with_spans(text)
        supervised = []   # [start, end) character ranges: " " + answer + eos
        cursor, end_text = 0, self.tokenizer.eos_token
        for role, answer in turns:
            if role != "assistant" or answer is None:
                continue
            at = text.index(self.template.assistant_prefix + answer.strip() + end_text, cursor)
            first = at + len(self.template.assistant_prefix) - 1   # the separating space
            cursor = first + 1 + len(answer.strip()) + len(end_text)
            supervised.append((first, cursor))
        mask = [int(end > start and any(start < stop and begin < end for begin, stop in supervised))
                for start, end in spans]
        return ids, mask

    def prompt_ids(self, text: str, with_ecg: bool) -> list[int]:
        """One user turn, open for the assistant's answer (serving interpretation): a prefix of
        the training ids of the same question (`interpretation_example`)."""
        return self.encode(self.text([("user", text), ("assistant", None)], with_ecg))

    def request_ids(self, text: str) -> list[int]:
        """A text-only request followed by the whole assistant prefix (serving generation): the
        ids a stage-2 training example holds before its `[ECG]` tokens."""
        return self.encode(self.text([("user", text)], with_ecg=False)
                           + self.template.assistant_prefix)

    def fixed_length(self, ids: Sequence[int], mask: Sequence[int], length: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Right-pads/truncates to `length`: (ids, loss mask, attention mask), each [length] i32."""
        ids, mask = list(ids[:length]), list(mask[:length])
        padding = length - len(ids)
        attention = [1] * len(ids) + [0] * padding
        return (np.array(ids + [self.pad_id] * padding, np.int32),
                np.array(mask + [0] * padding, np.int32), np.array(attention, np.int32))

    def interpretation_example(self, turns: Sequence[Turn], max_length: int) -> dict:
        """Stage-1 training fields for an ECG conversation: input_ids / loss_mask /
        attention_mask [max_length] i32 and ecg_position (index of the one `<ecg>`) i32."""
        ids, mask = self.conversation(turns, with_ecg=True)
        input_ids, loss_mask, attention = self.fixed_length(ids, mask, max_length)
        positions = np.flatnonzero(input_ids == self.placeholder_id)
        if len(positions) != 1:
            raise UniECGError(f"expected one {ECG_PLACEHOLDER} token within max_length="
                              f"{max_length}, found {len(positions)}")
        return dict(input_ids=input_ids, loss_mask=loss_mask, attention_mask=attention,
                    ecg_position=np.int32(positions[0]))

    def generation_example(self, report: str, ecg_token_ids: Sequence[int], max_length: int
                           ) -> dict:
        """Stage-2 training fields: the request `GENERATION_REQUEST + report` (exactly what
        `request_ids` builds at serving) answered by the `[ECG]` tokens and `</s>`; loss mask on
        those N + 1 tokens. A report too long for
        `max_length` loses its last tokens so the `[ECG]` tokens always fit.
        Returns input_ids / loss_mask / attention_mask [max_length] i32 and ecg_token_positions
        [N] i32."""
        ids = self.request_ids(GENERATION_REQUEST + report)
        answer = list(ecg_token_ids) + [self.tokenizer.eos_token_id]
        tail = self._ids(self.template.assistant_prefix)
        request_only = len(self.request_ids(GENERATION_REQUEST))
        if request_only + len(answer) > max_length:
            raise UniECGError(f"max_length={max_length} cannot hold the request and "
                              f"{len(ecg_token_ids)} [ECG] tokens")
        overflow = len(ids) + len(answer) - max_length
        if overflow > 0:  # cut the end of the report (just before the assistant prefix)
            ids = ids[:len(ids) - len(tail) - overflow] + tail
        start = len(ids)
        ids = ids + answer
        mask = [0] * start + [1] * len(answer)
        input_ids, loss_mask, attention = self.fixed_length(ids, mask, max_length)
        return dict(input_ids=input_ids, loss_mask=loss_mask, attention_mask=attention,
                    ecg_token_positions=np.arange(start, start + len(ecg_token_ids),
                                                  dtype=np.int32))
