"""The chat format, the `<ecg>` placeholder, the `[ECG{i}]` generation tokens, and `InputBuilder`:
the one object that turns conversations and requests into token ids and masks, for the training
examples (`data.pipelines.Stage1Example`, `Stage2Example`) and for serving
(`inference.interpret.Interpreter`, `inference.chat.UnifiedModel`) alike, so the two cannot drift.

Chat format (`VICUNA`, Vicuna-style as GEM's conversations):
    "<s>" + [system + " "] + "USER: <ecg>\\n{q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>"
Each piece (role prefix, content, answer) is tokenized on its own and the ids concatenated, so
serving prompts are prefixes of the training ids. A stage-2 request's content is one piece
(`GENERATION_REQUEST + report`): training used to tokenize the report apart from the request and
serving the request together with "USER: ", which split words differently at both seams
("report: sinus" -> ':', 'Ġ', 'sinus' vs ':', 'Ġsinus' in the tiny BPE); both now follow the
template. Swapping the template (e.g. for LLaVA's exact llava_v1 one) is a change to `VICUNA` /
`InputBuilder.template` only.

Two open prompts, as trained and served before they shared this builder:
  - `prompt_ids` (interpretation, stage 1): ends with "ASSISTANT:" (no space), GEM's generation
    prompt (LLaVA conversation.py `get_prompt`: `ret += role + ":"` for the open turn). Training
    tokenizes " ASSISTANT: " before the answer, so the served prompt stops one token (the space)
    short of the trained context; the llava_v1 switch removes that lone space token.
  - `request_ids` (generation, stage 2): ends with " ASSISTANT: ", exactly the ids a stage-2
    training example holds before its `[ECG]` tokens. (Serving interpretation with the trailing
    space too was tried: the tiny stage-2 test model then answered ECG prompts with special
    tokens only, as its two tasks were told apart by that last token; kept apart until the
    template switch.)

    builder = InputBuilder(tokenizer)
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
GENERATION_REQUEST = "Generate a 12-lead ECG that matches this report: "
# The default interpretation prompt: the first of the grounded conversations' questions.
INTERPRETATION_REQUEST = "Interpret this 12-lead ECG and give the evidence for your diagnosis."
Turn = tuple[str, str | None]   # (role, text); text None = open for the answer


def ecg_token_names(count: int) -> list[str]:
    """`[ECG0]..[ECG{count-1}]`: the stage-2 generation tokens, in order."""
    return [f"[ECG{i}]" for i in range(count)]


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """How turns become text pieces. Role prefixes and contents are tokenized separately.

    user_prefix / assistant_prefix: put before each user / assistant turn.
    ecg_separator: between the `<ecg>` placeholder and the first user text.
    ignored_markers: image/ECG markers removed from user text (the placeholder is placed here).
    """
    user_prefix: str = "USER: "
    assistant_prefix: str = " ASSISTANT: "
    ecg_separator: str = "\n"
    system_separator: str = " "
    ignored_markers: tuple[str, ...] = ("<image>", ECG_PLACEHOLDER)


VICUNA = ChatTemplate()


@dataclasses.dataclass(frozen=True, eq=False)
class InputBuilder:
    """Token ids, loss masks and ECG positions for every model input, in one format.

    tokenizer: any HF tokenizer with `<ecg>` (`data.tokenizer.load_tokenizer`); it is never
      modified here (grow it once with `data.tokenizer.add_ecg_tokens`).
    system: optional system prompt before the first user turn.
    """
    tokenizer: Any
    template: ChatTemplate = VICUNA
    system: str | None = None

    @property
    def placeholder_id(self) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(ECG_PLACEHOLDER)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {ECG_PLACEHOLDER} token; load it with "
                             "data.tokenizer.load_tokenizer()")
        return int(token_id)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def ecg_token_ids(self, count: int) -> list[int]:
        """Ids of `[ECG0]..[ECG{count-1}]`; raises if the tokenizer was not grown with them."""
        vocab = self.tokenizer.get_vocab()
        missing = [name for name in ecg_token_names(count) if name not in vocab]
        if missing:
            raise UniECGError(f"tokenizer lacks {missing[0]}..: add the [ECG] tokens once with "
                              "data.tokenizer.add_ecg_tokens(tokenizer, count)")
        return [int(vocab[name]) for name in ecg_token_names(count)]

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def conversation(self, turns: Sequence[Turn], with_ecg: bool = True
                     ) -> tuple[list[int], list[int]]:
        """Tokenizes a conversation.

        turns: [(role, text)] alternating "user"/"assistant", starting with "user". A final
          ("assistant", None) leaves the prompt open for the answer: "ASSISTANT:" without the
          trailing space, no answer, no `</s>` (GEM's generation prompt).
        with_ecg: one `<ecg>` placeholder (then `ecg_separator`) before the first user text.
        Returns (token ids [L], loss mask [L]: 1 on assistant answer tokens and their `</s>`).
        """
        template = self.template
        ids, mask = [self.tokenizer.bos_token_id], [0]

        def add(token_ids, trainable):
            ids.extend(token_ids)
            mask.extend([int(trainable)] * len(token_ids))

        for index, (role, text) in enumerate(turns):
            if role == "user":
                text = text or ""
                for marker in template.ignored_markers:
                    text = text.replace(marker, "")
                text = text.strip()
                system = (self.system + template.system_separator
                          if self.system and index == 0 else "")
                add(self._ids(system + template.user_prefix), False)
                if index == 0 and with_ecg:
                    add([self.placeholder_id], False)
                    text = template.ecg_separator + text
                add(self._ids(text), False)
            elif role == "assistant":
                prefix = template.assistant_prefix
                add(self._ids(prefix.rstrip() if text is None else prefix), False)
                if text is not None:
                    add(self._ids(text.strip()) + [self.tokenizer.eos_token_id], True)
            else:
                raise ValueError(f"unknown role {role!r} in turn {index}")
        return ids, mask

    def prompt_ids(self, text: str, with_ecg: bool) -> list[int]:
        """One user turn, open for the assistant's answer (serving interpretation): a prefix of
        the training ids of the same question (`interpretation_example`)."""
        return self.conversation([("user", text), ("assistant", None)], with_ecg=with_ecg)[0]

    def request_ids(self, text: str) -> list[int]:
        """A text-only request followed by the whole assistant prefix (serving generation): the
        ids a stage-2 training example holds before its `[ECG]` tokens."""
        return (self.conversation([("user", text)], with_ecg=False)[0]
                + self._ids(self.template.assistant_prefix))

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
