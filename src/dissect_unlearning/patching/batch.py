"""How a group of teacher-forced questions is laid out for the forward passes, and which logits are scored.

Every question is its prompt tokens followed by the vanilla answer's tokens (pipeline.answers rows), fed whole.
Alignments (which positions are scored):
- "answer" (default): the positions whose logits predict the answer tokens: no padding, no prompt, and the last
  answer token (which predicts nothing of the answer) left out. TeacherForcingBatch.answer_mask.
- "paper": the released code's rule, kept to compare with the paper's numbers. There the vanilla answers were
  generated in one left-padded batch per concept with EOS as the pad token, n = "tokens that are not EOS" was counted
  over the generated output (so the padding and any EOS inside the prompt shorten n), the decoded text (special tokens
  dropped) was fed back, and the *last n* logits of each row were scored: one position later than the positions that
  predict the answer. We reproduce that count from the exact token ids (the questions scored together stand for the
  generation batch) and use Python's slicing semantics for n <= 0 (logits[-0:] is the whole row), with a warning.

Layouts (how the sequences form the model's input):
- "padded": one row per question, left padded (prompts.teacher_forcing_batch), as in the paper. Used for "paper".
- "packed": the questions share their longest common prefix (the chat template's system prompt, ~24 tokens for
  SmolLM2), so it is computed once: each row holds the prefix followed by several questions' remaining tokens, and a
  custom 4D attention mask lets every token see the shared prefix and the earlier tokens of its own question only;
  position ids continue from the prefix. Each question computes what it computes alone (up to float rounding:
  ~1e-5 on the logits), with no padding and the prefix computed once per row instead of once per question: ~35%
  less work per pass for the default model's chat prompts. The engine checks the two layouts against each other on
  the source model before relying on the packed one.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from .. import prompts

ALIGNMENTS = ("answer", "paper")
LAYOUTS = ("auto", "packed", "padded")
PACK_CAPACITY = 512  # tokens per packed row: attention cost grows with its square


@dataclass
class ScoringInputs:
    """The model inputs of one group of questions and the flat list of scored positions, grouped by question."""

    model_inputs: dict  # input_ids, attention_mask (2D padding mask or 4D boolean mask), position_ids
    rows: torch.Tensor  # row of each scored position
    cols: torch.Tensor  # column (in the model input) of each scored position
    spans: list[slice]  # question q owns scored positions spans[q]
    positions: list[list[int]]  # per question: scored positions counted from the question's own first token
    layout: str
    # Where each question's own tokens sit (other_question_index moves activations between questions with them):
    # question q's own position t is at row owner[q][0], column t + owner[q][1] (t < shared in the packed layout:
    # the row's copy of the shared prefix, column t).
    owner: list[tuple[int, int]] = field(default_factory=list)
    lengths: list[tuple[int, int]] = field(default_factory=list)  # per question: (prompt tokens, all tokens)
    shared: int = 0  # tokens at the start that every question of the group shares (the chat template's system prompt)

    @property
    def n_questions(self) -> int:
        return len(self.spans)

    @property
    def keep(self) -> torch.Tensor:
        """The columns whose logits are needed (the model's logits_to_keep, as a 1D index tensor)."""
        return torch.unique(self.cols)

    def kept_cols(self) -> torch.Tensor:
        """Where each scored column sits inside logits computed for `keep` only."""
        return torch.searchsorted(self.keep, self.cols)

    def kept_grid(self) -> bool:
        """True when the scored positions are exactly the kept logits [rows, keep] in row-major order (no gather)."""
        n_rows, k = int(self.rows.max()) + 1, len(self.keep)
        return (len(self.rows) == n_rows * k and torch.equal(self.rows, torch.arange(n_rows).repeat_interleave(k))
                and torch.equal(self.kept_cols(), torch.arange(k).repeat(n_rows)))


def scoring_inputs(prompt_ids: list[list[int]], answer_ids: list[list[int]], tok, alignment: str = "answer",
                   layout: str = "auto", capacity: int = PACK_CAPACITY) -> ScoringInputs:
    """Build the model inputs and the positions to score for one group of questions."""
    if alignment not in ALIGNMENTS:
        raise ValueError(f"unknown alignment {alignment!r}; valid: {', '.join(ALIGNMENTS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    if alignment == "paper" and layout == "packed":
        raise ValueError("alignment='paper' scores positions of the left-padded batch (padding included when its "
                         "count says so): it needs layout='padded'")
    if len(prompt_ids) != len(answer_ids) or not prompt_ids:
        raise ValueError(f"need one answer per question and at least one question "
                         f"(got {len(prompt_ids)} prompts, {len(answer_ids)} answers)")
    for q, (p, a) in enumerate(zip(prompt_ids, answer_ids)):
        if not p:
            raise ValueError(f"question {q}: the prompt has no tokens")
        if not a:
            raise ValueError(f"question {q}: the vanilla answer has no tokens, so no position predicts it")
    pad_id = prompts.pad_id(tok)
    if alignment == "paper":
        return _paper(prompt_ids, answer_ids, tok, pad_id)
    if layout == "padded":
        # Answer alignment: TeacherForcingBatch.answer_mask marks the positions that predict the answer tokens.
        batch = prompts.teacher_forcing_batch(prompt_ids, answer_ids, pad_id)
        return _padded(batch, [torch.nonzero(m).flatten().tolist() for m in batch.answer_mask])
    # The logits at position t (counted in the question's own sequence) predict token t + 1.
    seqs = [list(p) + list(a) for p, a in zip(prompt_ids, answer_ids)]
    scored = [list(range(len(p) - 1, len(p) + len(a) - 1)) for p, a in zip(prompt_ids, answer_ids)]
    return _packed(seqs, scored, pad_id, capacity)


def _padded(batch: prompts.TeacherForcingBatch, cols_per_q: list[list[int]]) -> ScoringInputs:
    """One left-padded row per question; cols_per_q: the scored columns of each row."""
    width = batch.input_ids.shape[1]
    rows = [q for q, c in enumerate(cols_per_q) for _ in c]
    cols = [x for c in cols_per_q for x in c]
    first = [width - int(m.sum()) for m in batch.attention_mask]  # column of each question's first token
    positions = [[x - first[q] for x in c] for q, c in enumerate(cols_per_q)]  # padding: negative positions
    lengths = [(p, p + a) for p, a in zip(batch.n_prompt, batch.n_answer)]
    own = [batch.input_ids[q, first[q]:].tolist() for q in range(len(first))]
    return ScoringInputs(batch.model_inputs(), torch.tensor(rows), torch.tensor(cols), _spans(cols_per_q), positions,
                         "padded", [(q, f) for q, f in enumerate(first)], lengths, _shared_prefix(own, lengths))


def _packed(seqs, scored, pad_id, capacity) -> ScoringInputs:
    # The shared prefix stops before the first scored position of any question, so no scored logit is shared.
    limit = min(s[0] for s in scored)
    prefix = 0
    while prefix < limit and all(x[prefix] == seqs[0][prefix] for x in seqs):
        prefix += 1
    # Greedy rows: the prefix, then questions' remaining tokens in order while they fit.
    rows_of: list[list[int]] = [[]]
    used = prefix
    for q, x in enumerate(seqs):
        n = len(x) - prefix
        if rows_of[-1] and used + n > capacity:
            rows_of.append([])
            used = prefix
        rows_of[-1].append(q)
        used += n
    # Per row: token ids, position ids and segments (-1 shared prefix, q = question q), right padded below.
    row_ids, row_pos, row_seg = [], [], []
    where = {}
    for r, qs in enumerate(rows_of):
        tokens, positions, segments = list(seqs[0][:prefix]), list(range(prefix)), [-1] * prefix
        for q in qs:
            where[q] = (r, len(tokens) - prefix)  # column of the question's own position t: len(tokens) - prefix + t
            tokens += seqs[q][prefix:]
            positions += range(prefix, len(seqs[q]))
            segments += [q] * (len(seqs[q]) - prefix)
        row_ids.append(tokens)
        row_pos.append(positions)
        row_seg.append(segments)
    ids, _ = prompts.pad(row_ids, pad_id, "right")
    pos, _ = prompts.pad(row_pos, 0, "right")
    seg, _ = prompts.pad(row_seg, -2, "right")  # -2: padding
    width = ids.shape[1]
    idx = torch.arange(width)
    causal = idx[None, :] <= idx[:, None]
    same = (seg[:, None, :] == seg[:, :, None]) | (seg[:, None, :] == -1)  # [row, query, key]
    real = (seg != -2)
    mask = causal[None] & same & real[:, :, None] & real[:, None, :]
    mask |= torch.eye(width, dtype=torch.bool)[None] & ~real[:, :, None]  # padding sees itself: no empty softmax row
    rows = [where[q][0] for q, s in enumerate(scored) for _ in s]
    cols = [where[q][1] + t for q, s in enumerate(scored) for t in s]
    lengths = [(s[0] + 1, len(x)) for s, x in zip(scored, seqs)]  # the first scored position is the prompt's last
    return ScoringInputs({"input_ids": ids, "attention_mask": mask[:, None], "position_ids": pos},
                         torch.tensor(rows), torch.tensor(cols), _spans(scored), [list(s) for s in scored], "packed",
                         [where[q] for q in range(len(seqs))], lengths, prefix)


def _paper(prompt_ids, answer_ids, tok, pad_id) -> ScoringInputs:
    special = set(tok.all_special_ids)
    # Decoding with skip_special_tokens dropped the special tokens (the final EOS) from the fed-back text.
    fed = [[t for t in a if t not in special] for a in answer_ids]
    batch = prompts.teacher_forcing_batch(prompt_ids, fed, pad_id)
    width = batch.input_ids.shape[1]
    cols_per_q = []
    for q, n in enumerate(paper_counts(prompt_ids, answer_ids, tok.eos_token_id)):
        cols = list(range(width))[-n:]  # exactly logits[i, -length:, :]
        length = len(prompt_ids[q]) + len(fed[q])
        if n <= 0 or n > length:
            warnings.warn(f"alignment='paper': question {q}: the paper's rule counts n={n} answer tokens, so it "
                          f"scores {len(cols)} positions of which {max(0, len(cols) - length)} are padding "
                          f"(a quirk of the released code, reproduced on purpose)", stacklevel=3)
        cols_per_q.append(cols)
    return _padded(batch, cols_per_q)


def paper_counts(prompt_ids: list[list[int]], answer_ids: list[list[int]], eos_id: int) -> list[int]:
    """The released code's answer length: non-EOS tokens of the padded generation output minus the prompt width.

    In its generation batch every prompt is left padded with EOS to the longest one, so
    n = (answer tokens that are not EOS) - (padding of the prompt) - (EOS tokens inside the prompt).
    """
    width = max(len(p) for p in prompt_ids)
    return [sum(t != eos_id for t in a) - (width - len(p)) - p.count(eos_id) for p, a in zip(prompt_ids, answer_ids)]


def _shared_prefix(seqs: list[list[int]], lengths: list[tuple[int, int]]) -> int:
    """Tokens at the start every sequence shares, stopping before any prompt's last token (as the packed layout's)."""
    limit = min(p for p, _ in lengths) - 1
    n = 0
    while n < limit and all(x[n] == seqs[0][n] for x in seqs):
        n += 1
    return n


def other_question_index(inputs: ScoringInputs, shift: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols), each [rows of the input, columns of the input]: `value[rows, cols]` moves into every position of
    question q the value at the matching position of question (q + shift) mod n, another question of the same group.

    The control of "patching brings the knowledge back": if another question's activations restore the vanilla
    answer as well as the question's own, the patch itself does the work, not the knowledge it carries. Positions
    match by their part of the sequence: the shared prefix (the chat template's system prompt) keeps its own values
    (they are the same tokens); the rest of the prompt is aligned at its end, so that the template's closing tokens
    and the prompt's last token (which predicts the answer's first) meet their counterparts; the answer is aligned at
    its start. Where the other question's part is shorter, its first (prompt) or last (answer) token stands in.
    Padding keeps its own values.
    """
    n = inputs.n_questions
    if n < 2:
        raise ValueError("patching another question's activations (the coef_other control) needs at least two "
                         "questions per concept (n_questions), got 1")
    if not inputs.owner:
        raise ValueError("these scoring inputs do not record where each question sits (built by hand?); build them "
                         "with scoring_inputs")
    shape = inputs.model_inputs["input_ids"].shape
    rows = torch.arange(shape[0])[:, None].expand(shape).clone()
    cols = torch.arange(shape[1])[None, :].expand(shape).clone()

    def at(q: int, t: int) -> tuple[int, int]:
        r, offset = inputs.owner[q]
        return r, (t if t < inputs.shared and inputs.layout == "packed" else t + offset)

    shared = inputs.shared
    for q in range(n):
        p = (q + shift) % n
        (prompt_q, total_q), (prompt_p, total_p) = inputs.lengths[q], inputs.lengths[p]
        for t in range(shared, total_q):
            if t < prompt_q:
                source = max(shared, prompt_p - (prompt_q - t))
            else:
                source = min(prompt_p + (t - prompt_q), total_p - 1)
            r, c = at(q, t)
            rows[r, c], cols[r, c] = at(p, source)
    return rows, cols


def _spans(per_question) -> list[slice]:
    spans, start = [], 0
    for s in per_question:
        spans.append(slice(start, start + len(s)))
        start += len(s)
    return spans
