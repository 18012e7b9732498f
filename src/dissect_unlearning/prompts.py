"""Prompt formats, greedy vanilla answers with exact token spans, and teacher-forcing batches.

Later experiments score "the positions that predict the answer tokens". To know those positions exactly we never
re-tokenise the answer text: we keep the prompt token ids and the generated answer token ids, and build every
teacher-forced batch from them.

The token-level tools every layer above shares live here, once: `pad` (a batch of sequences, left or right padded,
with its mask), `greedy_generate` (batched greedy decoding, whose batches, generate() options and cut
generation.greedy_generate shares) and `token_logprobs` (the log-probability of each labelled token of a
teacher-forced batch; unlearning losses and perplexity are built from it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FORMATS = ("paper", "chat")
IGNORE = -100  # label of a position that carries no loss (prompt tokens, padding): cross_entropy's ignore_index
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


def pad_id(tok) -> int:
    """The token id that fills padding: the tokenizer's pad token, else its EOS, else 0.

    Its value never reaches a real token's output (padding is masked out, or comes after the sequence), so any id
    would do; generate() also fills finished rows with it, which answers are cut before."""
    for candidate in (tok.pad_token_id, tok.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def pad(seqs, value: int, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, width] filled with `value` around the sequences, mask [B, width]: 1 on the sequences' own tokens).

    side "left": every row ends in the last column, so a batch of prompts ends where generation starts (positions
    then come from the mask). side "right": every row starts in column 0, so its positions are the plain 0..n-1 and
    padding comes after the sequence, where a causal model never looks. `value` is a pad token id, or IGNORE for
    a batch of labels."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
            ids[i, cols] = torch.tensor(s, dtype=torch.long)
            mask[i, cols] = 1
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


def generate_batches(prompts: list[list[int]], batch_size: int, by_length: bool = False) -> list[list[int]]:
    """The indices of the prompts that share each batch of a batched generation: in the prompts' order, or with
    by_length=True sorted by length (similar lengths batch with less padding; the sort is stable).

    Batched greedy decoding equals the unbatched one only up to float rounding, so the batches are part of what an
    answer is: every generator of this package (greedy_generate here, generation.greedy_generate inside an nnsight
    request) forms them here, so the same prompts give the same batches whichever way they are run."""
    order = list(range(len(prompts)))
    if by_length:
        order.sort(key=lambda i: len(prompts[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def generate_options(max_new_tokens: int, stop: set[int], pad_token: int) -> dict:
    """The keyword arguments of transformers' generate() for greedy decoding of one batch: at most max_new_tokens
    tokens, each row finished by a token in `stop` (finished rows are then filled with pad_token, and the batch ends
    when every row has finished). The sampling settings are unset explicitly: a checkpoint's generation config may
    carry a temperature or top_p that would otherwise make generate() warn, or sample."""
    return dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_token,
                eos_token_id=sorted(stop) or None, temperature=None, top_p=None, top_k=None)


def cut_continuation(new: list[int], budget: int, stop: set[int]) -> list[int]:
    """A row's generated tokens, cut to its own budget and after its first stop token (which is kept): a batch
    generates up to its largest budget, and fills a finished row with padding."""
    new = new[:budget]
    end = next((j for j, t in enumerate(new) if t in stop), None)
    return new if end is None else new[:end + 1]


@torch.no_grad()
def greedy_generate(model, prompts: list[list[int]], max_new_tokens: int | list[int], stop: set[int], pad_token: int,
                    batch_size: int = 16, by_length: bool = False, progress: str | None = None) -> list[list[int]]:
    """The greedy continuation of each prompt (token ids): at most max_new_tokens[i] tokens (one int: the same for
    all), cut after the first token in `stop` (which is kept). Batched with left padding, on the model's device.

    Batches take the prompts in their order, or with by_length=True sorted by length (generate_batches). Batched
    greedy decoding equals the unbatched one only up to float rounding, so which prompts share a batch is the
    caller's to keep: a changed batch could flip a near-tie and change a stored answer.
    progress: the label of a progress bar over the batches (None: no bar).
    `model` may be a generation.Hosted (a model of nnsight requests, with or without an adapter).
    generation.greedy_generate is the same decoding inside an nnsight request (NDIF, or an adapter applied)."""
    from tqdm.auto import tqdm

    if callable(getattr(model, "greedy", None)):  # a generation.Hosted: the same batches, in one nnsight request
        return model.greedy(prompts, max_new_tokens, stop, pad_token, batch_size, by_length)
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in prompts]
    batches = generate_batches(prompts, batch_size, by_length)
    for batch in tqdm(batches, desc=progress, disable=progress is None, unit="batch"):
        ids, mask = pad([prompts[i] for i in batch], pad_token, "left")
        width = ids.shape[1]
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             **generate_options(max(budgets[i] for i in batch), stop, pad_token))
        for row, i in enumerate(batch):
            out[i] = cut_continuation(gen[row, width:].tolist(), budgets[i], stop)
    return out


def generate_answers(model, tok, questions: list[str], fmt: str = "auto", max_new_tokens: int = 30,
                     batch_size: int = 16, progress: bool | str = False) -> list[Answer]:
    """Greedy answers, batched with left padding; each equals the unbatched answer (tests check it)."""
    fmt = resolve_format(fmt, tok)
    prompts = [encode_prompt(q, tok, fmt) for q in questions]
    label = (progress if isinstance(progress, str) else "vanilla answers") if progress else None
    answers = greedy_generate(model, prompts, max_new_tokens, eos_ids(tok, model), pad_id(tok), batch_size,
                              by_length=True, progress=label)
    return [Answer(question=q, prompt_text=prompt_text(q, tok, fmt), prompt_ids=p, answer_ids=a,
                   answer_text=tok.decode(a, skip_special_tokens=True).strip())
            for q, p, a in zip(questions, prompts, answers)]


# Bytes of float32 logits a teacher-forced batch may hold at once. A training batch of the default model (8 x 256
# tokens x 49,152 entries: 0.4 GB) stays below it and runs the plain way; Gemma 3's 262,144-entry vocabulary makes
# the same batch 2.1 GB of logits, kept for backward together with their log-softmax, so its log-probs are computed
# a few positions at a time instead (see _chunked_logprobs).
LOGIT_BUDGET = 2**29


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                   reduction: str = "none") -> torch.Tensor:
    """log p(labels[:, t]) given the tokens before t, for a teacher-forced batch (inputs on the model's device).

    reduction "none": one value per predicted position [B, T - 1] (column t - 1 holds the log-prob of token t; 0
    where the label is IGNORE); "sum": their sum over the batch, summed inside cross_entropy, whose summation order
    perplexity has always used (a sum of the "none" values can differ in the last bits). In float32 whatever the
    model's dtype."""
    if reduction not in ("none", "sum"):
        raise ValueError(f"reduction must be 'none' or 'sum', got {reduction!r}")
    head = getattr(model, "lm_head", None)
    vocab = getattr(head, "out_features", 0)
    if (reduction == "none" and vocab and 4 * input_ids.numel() * vocab > LOGIT_BUDGET
            and callable(getattr(model, "get_decoder", None))):
        return _chunked_logprobs(model, head, input_ids, attention_mask, labels)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    # The logits at position t predict token t + 1.
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE,
                          reduction=reduction)
    return -(nll.view(target.shape) if reduction == "none" else nll)


def _chunked_logprobs(model, head, input_ids, attention_mask, labels) -> torch.Tensor:
    """token_logprobs without a [B, T, vocab] tensor: the decoder's hidden states, then the LM head (and the final
    soft-capping of a model that has it) and the cross-entropy a few positions at a time, each piece checkpointed so
    that its logits are recomputed in the backward pass rather than kept. The log-probs are those of the plain path;
    the LM head's weight gradient is a sum over the pieces, so it can differ from the plain path's in the last bits."""
    from torch.utils.checkpoint import checkpoint

    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
    target = labels[:, 1:]
    b, t = target.shape
    step = max(1, LOGIT_BUDGET // (4 * b * head.out_features))
    cap = getattr(model.config, "final_logit_softcapping", None)

    def piece(h, y):
        logits = head(h)
        if cap is not None:  # as the model's own forward does after its LM head
            logits = torch.tanh(logits / cap) * cap
        logits = logits.float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE,
                              reduction="none")
        return -nll.view(y.shape)

    grad = torch.is_grad_enabled()
    parts = [checkpoint(piece, hidden[:, a:a + step], target[:, a:a + step], use_reentrant=False) if grad
             else piece(hidden[:, a:a + step], target[:, a:a + step]) for a in range(0, t, step)]
    return torch.cat(parts, dim=1)


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
    ids, mask = pad(seqs, pad_id, "left")
    # Positions count real tokens only, so a padded row computes what the unpadded sequence would.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    width = ids.shape[1]
    answer_mask = torch.zeros_like(mask, dtype=torch.bool)
    for b, a in enumerate(answer_ids):
        if a:
            answer_mask[b, width - len(a) - 1: width - 1] = True
    return TeacherForcingBatch(ids, mask, position_ids, answer_mask, [len(a) for a in answer_ids],
                               [len(p) for p in prompt_ids])
