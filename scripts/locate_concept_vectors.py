#!/usr/bin/env python
"""Locate each concept's "concept vector" in a model and write its Layer/Dim into a concepts JSON file.

ConceptVectors stores, for each concept, one MLP value vector: column `Dim` of the MLP output projection of layer
`Layer` (for LLaMA-like models `model.model.layers[Layer].mlp.down_proj.weight[:, Dim]`). This script finds that
vector for our model by projecting value vectors onto the vocabulary (the "logit lens" view of the MLP):

1. Key tokens. The key words of a concept are the words of its name and of its accepted short answers
   (`QA_answers`), minus a few stop words, pure numbers and words of fewer than 3 characters. Each word is
   tokenised without and with a leading space; a variant that is a single token contributes that token. A word
   that is never a single token (e.g. " Gandalf" = " Gand" + "alf") contributes only the first piece of its
   leading-space variant, and only if that piece has at least 4 characters: trailing pieces ("alf", "ing") and
   short first pieces (" Hog", " Mar") belong to too many other words.
2. Projection. For each value vector v of each layer in the later half of the model (layers n//2 .. n-1; the
   paper's concept vectors live in middle-to-late layers), the vocabulary logits are
   l(v) = W_U (g * v), with W_U the unembedding and g the final norm's gain (1 + weight for Gemma).
3. Score. The z-score of a token is (l_t - mean(l)) / std(l), mean and std over the whole vocabulary; the score of
   (concept, v) is the mean z-score over the concept's key tokens. Mean and std are computed exactly from the first
   two moments of the rows of W_U diag(g), in float64, so no vocabulary-sized matrix per layer is materialised.
4. Pick. Every concept gets its own vector: repeatedly, the (concept, location) pair with the highest score among
   concepts not yet placed and locations not yet taken is fixed (for a concept whose best vector is free this is
   simply its argmax; when two concepts want the same vector, the higher score wins and the other takes its next
   best). The result does not depend on the order of the file.

Deterministic (float64, fixed order, ties broken by the lowest layer then column). Rewrites only Layer and Dim.

    .venv/bin/python scripts/locate_concept_vectors.py                   # the shipped set, default model
    .venv/bin/python scripts/locate_concept_vectors.py --dry-run --top 5 # print, do not write
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dissect_unlearning import models  # noqa: E402

DEFAULT_FILE = ROOT / "src" / "dissect_unlearning" / "data" / "concepts.json"
STOP_WORDS = {"the", "of", "and", "a", "an", "de", "la", "le", "in", "on", "to"}
MIN_WORD_CHARS = 3  # shorter words ("UK", "Re") are abbreviations or fragments shared by many words
MIN_PIECE_CHARS = 4  # the first piece of a multi-token word must be at least this long to stand for the word


def key_words(record: dict) -> list[str]:
    phrases = [record["Concept"]]
    for ans in record.get("QA_answers") or []:
        phrases += [ans] if isinstance(ans, str) else list(ans)
    words = []
    for phrase in phrases:
        for w in re.split(r"[\s/]+", phrase):
            w = w.strip(".,;:!?\"'()")
            if w.endswith("'s") or w.endswith("\u2019s"):
                w = w[:-2]
            if len(w) < MIN_WORD_CHARS or w.lower() in STOP_WORDS or not re.search(r"[A-Za-z]", w):
                continue
            if w not in words:
                words.append(w)
    return words


def word_token_ids(word: str, tok) -> list[int]:
    ids = []
    for variant in (word, " " + word):
        pieces = tok(variant, add_special_tokens=False)["input_ids"]
        if len(pieces) == 1 and pieces[0] not in ids:
            ids.append(pieces[0])
    if not ids:
        first = tok(" " + word, add_special_tokens=False)["input_ids"][0]
        if len(tok.decode([first]).strip()) >= MIN_PIECE_CHARS:
            ids.append(first)
    return ids


def key_token_ids(record: dict, tok) -> list[int]:
    ids: list[int] = []
    for w in key_words(record):
        ids += [t for t in word_token_ids(w, tok) if t not in ids]
    return ids


def value_vectors(model):
    """[(layer index, value matrix [d_model, n_values])] for every layer, as float64."""
    import torch

    arch = models.architecture_of(model)
    out = []
    for i, layer in enumerate(models.get_module(model, arch.layers)):
        w = models.get_module(layer, arch.value_weight).detach().to(torch.float64)
        out.append((i, w if arch.value_axis == 1 else w.T))
    return out


def unembedding(model):
    """W_U diag(g) [vocab, d_model] in float64: the map from a residual-stream direction to logits."""
    import torch

    arch = models.architecture_of(model)
    w_u = models.get_module(model, arch.lm_head).weight.detach().to(torch.float64)
    norm = models.get_module(model, arch.final_norm)
    g = getattr(norm, "weight", None)
    g = torch.ones(w_u.shape[1], dtype=torch.float64) if g is None else g.detach().to(torch.float64)
    if arch.family.startswith("gemma"):  # Gemma's RMSNorm scales by (1 + weight)
        g = 1.0 + g
    return w_u * g[None, :]


def score_all(model, token_sets: list[list[int]], layers: list[int]):
    """scores[c][k] = mean key-token z-score of every value vector of layers[k], per concept c: [n_values] tensors."""
    import torch

    a = unembedding(model)  # [V, d]
    mu = a.mean(0)  # [d]
    cov = a.T @ a / a.shape[0] - torch.outer(mu, mu)  # [d, d]: vocabulary covariance of logit directions
    vecs = dict(value_vectors(model))
    scores = [[None] * len(layers) for _ in token_sets]
    for k, li in enumerate(layers):
        v = vecs[li]  # [d, n]
        mean = mu @ v  # [n]
        std = torch.sqrt(torch.clamp(((cov @ v) * v).sum(0), min=1e-30))  # [n]
        for c, ids in enumerate(token_sets):
            logits = a[ids] @ v  # [len(ids), n]
            scores[c][k] = ((logits - mean) / std).mean(0)
    return scores


def locate(records: list[dict], model, tok, first_layer: int | None = None, top: int = 0):
    import torch

    n = models.n_layers(model)
    layers = list(range(n // 2 if first_layer is None else first_layer, n))
    token_sets = [key_token_ids(r, tok) for r in records]
    for r, ids in zip(records, token_sets):
        if not ids:
            raise SystemExit(f"concept {r['Concept']!r}: no usable key tokens")
    scores = score_all(model, token_sets, layers)
    s = torch.stack([torch.cat(per_layer) for per_layer in scores])  # [n_concepts, n_layers_searched * n_values]
    n_values = scores[0][0].shape[0]

    def loc(flat_index: int) -> tuple[int, int]:
        return layers[flat_index // n_values], flat_index % n_values

    # Greedy by score over (concept, location) pairs: unique locations, independent of the file's order. Ties go to
    # the lower concept index, then the lower layer and column (torch.argmax returns the first maximum).
    free = s.clone()
    chosen: dict[int, int] = {}
    while len(chosen) < len(records):
        c, k = divmod(int(torch.argmax(free)), free.shape[1])
        chosen[c] = k
        free[c, :] = -torch.inf
        free[:, k] = -torch.inf
    a = unembedding(model)
    vecs = dict(value_vectors(model))
    results = []
    for c, (r, ids) in enumerate(zip(records, token_sets)):
        layer, dim = loc(chosen[c])
        others = [k for k in torch.argsort(-s[c], stable=True)[: top + len(records)].tolist() if k != chosen[c]]
        ranked = [((layer, dim), float(s[c, chosen[c]]))] + [(loc(k), float(s[c, k])) for k in others[: max(0, top - 1)]]
        logits = a @ vecs[layer][:, dim]
        top_tokens = [tok.decode([t]) for t in torch.topk(logits, 12).indices.tolist()]
        results.append({"Concept": r["Concept"], "Layer": layer, "Dim": dim, "score": ranked[0][1], "ranked": ranked,
                        "key_tokens": [tok.decode([t]) for t in ids], "top_tokens": top_tokens})
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", nargs="?", default=str(DEFAULT_FILE), help="concepts JSON file (rewritten in place)")
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--first-layer", type=int, default=None, help="first layer searched (default: n_layers // 2)")
    ap.add_argument("--dry-run", action="store_true", help="print the locations, do not write the file")
    ap.add_argument("--top", type=int, default=1, help="print this many best locations per concept")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    path = Path(args.file)
    records = json.loads(path.read_text(encoding="utf-8"))
    model, tok = models.load(args.model)
    results = locate(records, model, tok, args.first_layer, args.top)
    for res in results:
        print(f"{res['Concept']:24s} layer {res['Layer']:2d} dim {res['Dim']:5d}  mean z {res['score']:.2f}")
        print(f"    key tokens: {res['key_tokens']}")
        print(f"    top tokens of the vector: {res['top_tokens']}")
        for (layer, dim), score in res["ranked"][1:]:
            print(f"    other candidate: layer {layer:2d} dim {dim:5d}  mean z {score:.2f}")
    if args.dry_run:
        return 0
    for rec, res in zip(records, results):
        rec["Layer"], rec["Dim"] = res["Layer"], res["Dim"]
    triples = {(r["Concept"], r["Layer"], r["Dim"]) for r in records}
    assert len(triples) == len(records), "duplicate (Concept, Layer, Dim)"
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote Layer/Dim of {len(records)} concepts to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
