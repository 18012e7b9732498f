"""Prompt formats, greedy vanilla answers with exact token spans, and teacher-forcing batches.

Later experiments score "the positions that predict the answer tokens". To know those positions exactly we never
re-tokenise the answer text: we keep the prompt token ids and the generated answer token ids, and build every
teacher-forced batch from them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FORMATS = ("paper", "chat")
PAPER_TEMPLATE = "Question: {q}\n Answer:"


def resolve_format(fmt: str, tok) -> str:
    """'auto' = chat for a tokenizer with a chat template (instruct models), else the paper's template."""
    if fmt == "auto":
        return "chat" if getattr(tok, "chat_template", None) else "paper"
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; valid: auto, {', '.join(FORMATS)}")
    if fmt == "chat" and not getattr(tok, "chat_template", None):
        raise ValueError("prompt format 'chat' needs a tokenizer with a chat template; this one has none "
                         "(use 'paper')")
    return fmt


def prompt_text(question: str, tok, fmt: str) -> str:
    fmt = resolve_format(fmt, tok)
    if fmt == "paper":
        return PAPER_TEMPLATE.format(q=question)
    return tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                   tokenize=False)


def encode_prompt(question: str, tok, fmt: str) -> list[int]:
    fmt = resolve_format(fmt, tok)
    text = prompt_text(question, tok, fmt)
    # The chat template already contains its special tokens; the paper's template gets the tokenizer's BOS (if any).
    return tok(text, add_special_tokens=(fmt == "paper"))["input_ids"]


@dataclass
class Answer:
    question: str
    prompt_text: str
    prompt_ids: list[int]
    answer_ids: list[int]  # generated tokens, up to and including the first EOS (if one was generated)
    answer_text: str  # decoded answer, special tokens removed

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.answer_ids


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def eos_ids(tok, model=None) -> set[int]:
    ids = set()
    for src in (getattr(tok, "eos_token_id", None), getattr(getattr(model, "generation_config", None),
                                                             "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(src)
    return ids


@torch.no_grad()
def generate_answers(model, tok, questions: list[str], fmt: str = "auto", max_new_tokens: int = 30,
                     batch_size: int = 16, progress: bool | str = False) -> list[Answer]:
    """Greedy answers, batched with left padding; each equals the unbatched answer (tests check it)."""
    from tqdm.auto import tqdm

    fmt = resolve_format(fmt, tok)
    prompts = [encode_prompt(q, tok, fmt) for q in questions]
    stop = eos_ids(tok, model)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else next(iter(stop))
    device = next(model.parameters()).device
    out: list[Answer] = []
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths batch with less padding
    results: dict[int, list[int]] = {}
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    desc = progress if isinstance(progress, str) else "vanilla answers"
    for batch in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
        ids, mask = left_pad([prompts[i] for i in batch], pad_id)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, pad_token_id=pad_id, eos_token_id=sorted(stop) or None,
                             temperature=None, top_p=None, top_k=None)
        for row, i in enumerate(batch):
            new = gen[row, ids.shape[1]:].tolist()
            cut = next((j for j, t in enumerate(new) if t in stop), None)
            results[i] = new if cut is None else new[:cut + 1]
    for i, q in enumerate(questions):
        out.append(Answer(question=q, prompt_text=prompt_text(q, tok, fmt), prompt_ids=prompts[i],
                          answer_ids=results[i], answer_text=tok.decode(results[i], skip_special_tokens=True).strip()))
    return out


@dataclass
class TeacherForcingBatch:
    """Left-padded prompt+answer sequences and where the answer is.

    answer_mask[b, t] is True where the logits at position t predict an answer token (t = p - 1 for answer token
    at p): the positions the paper's loss is meant to cover (alignment "answer").
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    answer_mask: torch.Tensor
    n_answer: list[int]
    n_prompt: list[int]

    def to(self, device) -> "TeacherForcingBatch":
        return TeacherForcingBatch(self.input_ids.to(device), self.attention_mask.to(device),
                                   self.position_ids.to(device), self.answer_mask.to(device), self.n_answer,
                                   self.n_prompt)

    def model_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}


def teacher_forcing_batch(prompt_ids: list[list[int]], answer_ids: list[list[int]], pad_id: int
                          ) -> TeacherForcingBatch:
    seqs = [p + a for p, a in zip(prompt_ids, answer_ids)]
    ids, mask = left_pad(seqs, pad_id)
    # Positions count real tokens only, so a padded row computes what the unpadded sequence would.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    width = ids.shape[1]
    answer_mask = torch.zeros_like(mask, dtype=torch.bool)
    for b, a in enumerate(answer_ids):
        if a:
            answer_mask[b, width - len(a) - 1: width - 1] = True
    return TeacherForcingBatch(ids, mask, position_ids, answer_mask, [len(a) for a in answer_ids],
                               [len(p) for p in prompt_ids])
