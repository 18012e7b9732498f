"""The stages of a chapter, each cached by its inputs: answers -> unlearned models -> sweeps -> scores.

Notebooks call this module (plus `plots` and `verdicts`) and nothing deeper.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from pathlib import Path

import pandas as pd

from . import cache, concepts as concepts_mod, models, prompts, tables, validate

ANSWER_COLUMNS = [
    "model", "concept", "concept_index", "kind", "question_index", "question", "prompt_format", "prompt_text",
    "prompt_ids", "answer_ids", "answer_text", "n_prompt_tokens", "n_answer_tokens", "expected", "correct",
]


def load_concepts(source="builtin", select=None) -> concepts_mod.ConceptSet:
    return concepts_mod.load(source).select(select)


def answers(model: str = models.DEFAULT_MODEL, concepts="builtin", select=None, prompt_format: str = "auto",
            max_new_tokens: int = 30, batch_size: int = 16, include_unrelated: bool = True, progress: bool = True,
            loaded=None, remote=False) -> pd.DataFrame:
    """The vanilla model's greedy answers to every question of the selected concepts (cached).

    One row per (concept, kind, question): kind 'target' for the concept's own questions, 'unrelated' for its
    unrelated questions. `loaded` = an already loaded (model, tokenizer) of `model`, to skip a reload.
    remote: False (generated here), True (generated on NDIF, in one request: nothing is loaded here) or "local"
    (nnsight's offline simulation of that request). Each place keeps its own cache entry: NDIF's hardware and dtype
    give answers of their own, and every stage of a remote study reads these.
    Columns: see ANSWER_COLUMNS; `prompt_ids` / `answer_ids` are the exact token spans.
    """
    validate.check_int(max_new_tokens, "max_new_tokens", 1)
    validate.check_int(batch_size, "batch_size", 1)
    cset = concepts if isinstance(concepts, concepts_mod.ConceptSet) else load_concepts(concepts, select)
    if isinstance(concepts, concepts_mod.ConceptSet) and select is not None:
        cset = cset.select(select)
    tok = loaded[1] if loaded else models.load_tokenizer(model)
    fmt = prompts.resolve_format(prompt_format, tok)
    inputs = {
        "model": models.identity(model),
        "concepts": [c.content_hash() for c in cset],
        "prompt_format": fmt,
        "generation": {"max_new_tokens": max_new_tokens, "greedy": True, "batch_size": batch_size},
        "include_unrelated": include_unrelated,
    }
    if remote:
        inputs["generated"] = _PLACE[remote]

    def build(folder: Path) -> None:
        m, t = (hosted(model, remote)[0], tok) if remote else loaded if loaded else models.load(model)
        rows = []
        for c in cset:
            for i, q in enumerate(c.questions):
                exp = c.answers[i] if c.answers else None
                rows.append((c, "target", i, q, exp))
            if include_unrelated:
                for i, q in enumerate(c.unrelated_questions):
                    rows.append((c, "unrelated", i, q, None))
        unique = list(dict.fromkeys(r[3] for r in rows))  # unrelated questions repeat across concepts
        generated = prompts.generate_answers(m, t, unique, fmt, max_new_tokens, batch_size,
                                             progress="vanilla answers" if progress else False)
        by_q = dict(zip(unique, generated))
        records = []
        for c, kind, i, q, exp in rows:
            a = by_q[q]
            records.append({
                "model": model, "concept": c.label, "concept_index": c.index, "kind": kind, "question_index": i,
                "question": q, "prompt_format": fmt, "prompt_text": a.prompt_text, "prompt_ids": a.prompt_ids,
                "answer_ids": a.answer_ids, "answer_text": a.answer_text, "n_prompt_tokens": len(a.prompt_ids),
                "n_answer_tokens": len(a.answer_ids), "expected": exp,
                "correct": None if exp is None else concepts_mod.answer_matches(a.answer_text, exp),
            })
        tables.write_parquet(pd.DataFrame.from_records(records, columns=ANSWER_COLUMNS), folder / "answers.parquet")

    folder = cache.get_or_build("answers", inputs, build)
    return pd.read_parquet(folder / "answers.parquet")


# Where a remote stage ran, as its cache entries record it (remote=False adds nothing: the entries of before).
_PLACE = {True: "ndif", "local": "nnsight-simulation"}


def hosted(model: str, remote, adapter=None):
    """(generation.Hosted, torch module) of `model` for a stage that runs in nnsight requests: remote=True on NDIF
    (preflight first; the model is built on the meta device, nothing loaded here), remote="local" in nnsight's
    offline simulation (the model loaded here, as NDIF would run it). adapter: None for the vanilla model, an
    unlearning.adapter.Adapter for the unlearned one."""
    from . import patching
    from .generation import Hosted

    if remote is True:
        patching.remote.preflight(model)
        lm, _ = models.remote_model(model)
    elif remote == "local":
        m, tok = models.load(model)
        lm = patching.wrap(m, tok)
    else:
        raise ValueError(f"hosted: remote must be True or 'local', got {remote!r}")
    return Hosted(lm, adapter, remote), models.torch_module(lm)


# --------------------------------------------------------------------------------------------------------------------
# Unlearned models
# --------------------------------------------------------------------------------------------------------------------
def unlearned(model: str = models.DEFAULT_MODEL, concepts="builtin", concept: str | int = 0, method: str = "grad_diff",
              progress: bool = True, remote=False, **settings):
    """The model `model` with `concept` unlearned by `method` (cached; trained on first use).

    `settings` override the method's defaults (see unlearning.UnlearnConfig). remote: False (trained here), True (an
    adapter, params="lora", trained in NDIF requests: unlearning/remote.py) or "local" (the same requests in nnsight's
    offline simulation); a remote run is an entry of its own, and reads the vanilla answers generated there too.
    Returns an `Unlearned` handle:
    .load() -> (model, tokenizer), .label, .method, .concept, .settings, .loss_curve, .folder, .identity(),
    .size_bytes, .train_seconds. Two processes asking for the same model train it once (a lock); an interrupted run
    leaves no entry.
    """
    from .unlearning import UnlearnConfig, artefact, data as unlearning_data, methods as methods_mod
    from .unlearning import relearn as relearn_mod

    cset = concepts if isinstance(concepts, concepts_mod.ConceptSet) else load_concepts(concepts)
    target = cset.get(concept)
    if target.never_known:
        raise ValueError(f"concept {target.label!r} is marked never_known: a control no model knows, with nothing to "
                         f"unlearn (concepts.never_known)")
    config = UnlearnConfig.for_method(method, **settings)
    config = config.replace(prompt_format=prompts.resolve_format(config.prompt_format, models.load_tokenizer(model)))
    if remote:
        from .unlearning import remote as remote_training

        remote_training.check_settings(config, remote, remote_training.CHUNK_STEPS)
    retain = unlearning_data.choose_retain(cset, target, config.seed, config.retain_concept)
    inputs = {
        "model": models.identity(model),
        "concept": target.content_hash(),
        "retain": retain.content_hash(),
        "method": config.method,
        "settings": config.to_dict(),
    }
    if remote:
        inputs["trained"] = _PLACE[remote]
    forget = target
    if methods_mod.get(method).text == "unrelated":
        # The control fine-tune: the target's retain data, and in place of the target's own text that of a concept
        # that gives away none of the target's answers (chosen as relearning's unrelated text is) and that the
        # held-out perplexity does not read (a text the control learned would make it look harmless there)
        used = {target.name, retain.name, *(h.name for h in heldout_concepts(cset, target, retain))}
        candidates = [c for c in cset if c.name not in used]
        if not candidates:
            raise ValueError(f"method {method!r}: the control fine-tune of {target.label!r} learns the text of a "
                             f"concept that is neither the target, its retain concept nor a held-out text "
                             f"({', '.join(sorted(used))}); the concept set has no other")
        source, _ = relearn_mod.unrelated_concept(target, candidates)
        forget = dataclasses.replace(target, forget_text=source.forget_text)
        inputs["text_concept"] = source.content_hash()

    trained: list = []

    def build(folder: Path) -> None:
        qa = {}
        if "qa" in config.forget_data.split("+") or config.retain_qa:  # the vanilla answers are the ones trained on
            qa = vanilla_qa(model, [target, retain], config.prompt_format, config.max_new_tokens, progress, remote)
        artefact.build(folder, model, forget, retain, config, qa=qa.get(target.label),
                       retain_qa=qa.get(retain.label), identity=inputs, progress=progress,
                       trained=trained if artefact.keeping() and not remote else None,
                       hosted=hosted(model, remote)[1] if remote else None, remote=remote)

    folder = cache.get_or_build("unlearned", inputs, build)
    if trained:  # just trained here, inside keep_loaded(): the stages after this one start from it
        artefact.keep(folder, *trained[0])
    return artefact.Unlearned(folder)


def vanilla_qa(model: str, concept_list, prompt_format: str, max_new_tokens: int = 30, progress: bool = False,
               remote=False) -> dict[str, list[tuple[str, list[int], list[int]]]]:
    """{concept label: [(question, prompt_ids, answer_ids)]}: the vanilla answers to each concept's own questions."""
    cset = concepts_mod.ConceptSet(list(concept_list), "")
    df = answers(model, cset, prompt_format=prompt_format, max_new_tokens=max_new_tokens, include_unrelated=False,
                 progress=progress, remote=remote)
    out = {}
    for c in cset:
        rows = df[(df.concept == c.label) & (df.kind == "target")].sort_values("question_index")
        out[c.label] = [(q, list(p), list(a)) for q, p, a in zip(rows.question, rows.prompt_ids, rows.answer_ids)]
    return out


BEHAVIOUR_COLUMNS = ["model", "concept", "method", "stage", "split", "metric", "value", "n", "retain_concept",
                     "settings", "versions"]


def behaviour(model: str = models.DEFAULT_MODEL, concepts="builtin", select=None,
              methods=("grad_diff", "dpo", "npo"), prompt_format: str = "auto", settings: dict | None = None,
              progress: bool = True, remote=False) -> pd.DataFrame:
    """Behavioural scores of the vanilla and the unlearned models, one row per (concept, method, stage, split, metric).

    stage: 'vanilla' | 'unlearned'. split / metrics: 'target' and 'unrelated' questions (BLEU and ROUGE-L of the answer
    against the vanilla answer, accuracy against expected answers where the concept set has them), 'completion'
    (ROUGE-L of greedy text completions), 'forget_text' and 'heldout_text' (perplexity; held-out = the forget texts of
    two concepts used neither as forget nor as retain). `settings`: overrides for every method, or a dict
    {method: overrides}. Each (concept, method) is cached on its own (kind 'behaviour').
    remote True / "local": the adapter models of `unlearned(..., remote=remote)`, every answer, continuation and
    perplexity computed in nnsight requests (on NDIF, or in its offline simulation) with the vanilla model's own
    weights and the adapter applied there; the same scores, in the same batches.
    """
    from . import metrics
    from .generation import Hosted
    from .unlearning import UnlearnConfig

    for method in methods:  # the settings of every method, before the vanilla answers are generated
        UnlearnConfig.for_method(method, **_method_settings(settings, method))
    cset = concepts if isinstance(concepts, concepts_mod.ConceptSet) else load_concepts(concepts)
    chosen = cset.select(select)
    fmt = prompts.resolve_format(prompt_format, models.load_tokenizer(model))
    van = answers(model, chosen, prompt_format=fmt, progress=progress, remote=remote)
    expected = {q: alts for c in cset if c.answers for q, alts in zip(c.questions, c.answers)}
    common = {"model": models.identity(model), "prompt_format": fmt,
              "expected": cache.content_hash(expected), "max_new_tokens": 30}
    if remote:
        common["computed"] = _PLACE[remote]
    vanilla_model: list = []  # loaded on first need

    def vanilla_loaded():
        """(model, tokenizer) of the vanilla model, made once: a generation.Hosted when remote (its requests serve
        the unlearned models too, with their adapters)."""
        if not vanilla_model:
            vanilla_model.append((hosted(model, remote)[0], models.load_tokenizer(model)) if remote
                                 else models.load(model))
        return vanilla_model[0]

    def scores(m, tok, c, heldout, generate: bool, scored: list[int]) -> pd.DataFrame:
        rows = []
        for split in ("target", "unrelated"):
            v = van[(van.concept == c.label) & (van.kind == split)].sort_values("question_index")
            if split == "target":
                v = v[v.question_index.isin(scored)]  # the questions the unlearned model was not trained on
            refs, questions = list(v.answer_text), list(v.question)
            texts = ([a.answer_text for a in prompts.generate_answers(m, tok, questions, fmt, 30, 16)]
                     if generate else refs)
            rows += [(split, "bleu", metrics.mean(map(metrics.bleu, texts, refs)), len(texts)),
                     (split, "rougeL", metrics.mean(map(metrics.rouge_l, texts, refs)), len(texts))]
            acc = [metrics.accuracy(t, expected[q]) for t, q in zip(texts, questions) if q in expected]
            if acc:
                rows.append((split, "accuracy", metrics.mean(acc), len(acc)))
        if c.text_completion:
            comp = metrics.completion_rouge(m, tok, c.text_completion)
            rows.append(("completion", "rougeL", metrics.mean(comp), len(comp)))
        rows.append(("forget_text", "perplexity", *metrics.perplexity(m, tok, [c.forget_text])))
        if heldout:
            rows.append(("heldout_text", "perplexity", *metrics.perplexity(m, tok, [h.forget_text for h in heldout],
                                                                          max_tokens=256)))
        return pd.DataFrame(rows, columns=["split", "metric", "value", "n"])

    def cached(inputs: dict, compute) -> pd.DataFrame:
        def build(folder: Path) -> None:
            tables.write_parquet(compute(), folder / "scores.parquet")
        return pd.read_parquet(cache.get_or_build("behaviour", inputs, build) / "scores.parquet")

    frames = []
    for c in chosen:
        for method in methods:
            overrides = _method_settings(settings, method)
            overrides.setdefault("prompt_format", fmt)
            u = unlearned(model, cset, c.label, method, progress=progress, remote=remote, **overrides)
            heldout = heldout_concepts(cset, c, cset.get(u.retain_concept))
            scored = scorable(u.config, c)
            place = {"concept": c.content_hash(), "heldout": [h.content_hash() for h in heldout], "questions": scored}

            def vanilla_scores(c=c, heldout=heldout, scored=scored):
                return scores(*vanilla_loaded(), c, heldout, generate=False, scored=scored)

            def unlearned_scores(u=u, c=c, heldout=heldout, scored=scored):
                if remote:  # the vanilla model's requests with the run's adapter applied in them
                    vanilla, tok = vanilla_loaded()
                    m = Hosted(vanilla.lm, u.adapter(), remote)
                else:
                    m, tok = u.load(shared=True)  # generation and perplexity leave it as it is
                return scores(m, tok, c, heldout, generate=True, scored=scored)

            for stage, table in (("vanilla", cached({**common, **place, "stage": "vanilla"}, vanilla_scores)),
                                 ("unlearned", cached({**common, **place, "stage": "unlearned",
                                                       "unlearned": u.identity()}, unlearned_scores))):
                table = table.assign(model=model, concept=c.label, method=u.label, stage=stage,
                                     retain_concept=u.retain_concept,
                                     settings=cache.canonical_json(u.settings),
                                     versions=cache.canonical_json(u.record["versions"]))
                frames.append(table[BEHAVIOUR_COLUMNS])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=BEHAVIOUR_COLUMNS)


def heldout_concepts(cset, concept, retain) -> list:
    """The concepts whose forget texts behaviour() measures held-out perplexity on: the first two of the set that are
    neither the forgotten nor the retained concept."""
    return [h for h in cset if h.name not in (concept.name, retain.name)][:2]


def _methods() -> tuple[str, ...]:
    from .unlearning import METHODS

    return METHODS


def _method_settings(settings: dict | None, method: str) -> dict:
    """behaviour()'s `settings` for one method: overrides for every method, or {method: overrides}."""
    return dict(settings.get(method, {}) if settings and set(settings) <= set(_methods()) else settings or {})


# --------------------------------------------------------------------------------------------------------------------
# Patching sweeps and layer changes
# --------------------------------------------------------------------------------------------------------------------
def sweep(vanilla: str = models.DEFAULT_MODEL, unlearned=None, concepts="builtin", concept=None,
          experiments=None, window: int = 5, layers=None, alignment: str = "answer",
          prompt_format: str = "auto", questions: int | None = None, kind: str = "target",
          direction: str = "forward", remote=False, progress: bool = True) -> pd.DataFrame:
    """Patching / restoration sweep of one concept's questions on a vanilla/unlearned pair (cached, kind 'sweep').

    unlearned: a model name or checkpoint folder; or a handle with .load() -> (model, tok) and .identity() -> dict
    (what pipeline.unlearned returns); or an already loaded (model, tokenizer) tuple (then nothing is cached).
    concept: name, label, id or index (may be left out when the set has one concept). kind: 'target' (the concept's
    questions) or 'unrelated'. questions: use only the first N. layers: one explicit window (e.g. [-1], the last
    layer) or a list of them ([[27, 28, 29], [29]]) instead of the centred windows of size `window`. direction
    'reverse' patches the unlearned model's window into the vanilla model. remote: False, True (NDIF) or 'local'.
    One row per (experiment, window, question); columns: patching.SWEEP_COLUMNS, described in docs/sweep-schema.md.
    """
    from . import patching

    chosen = patching.PAPER_EXPERIMENTS if experiments is None else experiments  # None: the paper's four
    exps = [e.name for e in patching.experiments.get(chosen)]
    _refuse_local(unlearned, remote)
    if getattr(unlearned, "is_adapter", False) and remote is True:
        # restorations are adapter terms switched in the request: every experiment can run; NDIF asked first
        patching.remote.preflight(vanilla)
    else:
        patching.check_remote(remote, patching.experiments.get(exps))  # before any work
    if isinstance(vanilla, str):  # the layer count from the config: a window must fit the model it slides over
        n_layers = models.n_layers_of(vanilla)
        validate.check_window(window, n_layers if layers is None else None)  # explicit layers replace the windows
        validate.check_layers(layers, n_layers)
        other = models.n_layers_of(str(unlearned)) if isinstance(unlearned, (str, Path)) else None
        if n_layers and other and other != n_layers:
            raise ValueError(f"unlearned: {unlearned} has {other} layers, the vanilla model {vanilla!r} {n_layers}: "
                             f"patching needs two models of one architecture")
    settings = _patching_settings(window, layers, alignment, kind, direction, questions)

    def compute(pair, tok, rows):
        return patching.run(pair[0], pair[1], tok, _ids(rows.prompt_ids), _ids(rows.answer_ids), exps,
                            window=window, layers=layers, alignment=alignment, direction=direction, remote=remote,
                            progress="patching sweep" if progress else False)

    df, ctx = _pair_table("sweep", compute, vanilla, unlearned, concepts, concept, prompt_format, questions, kind,
                          remote, {**settings, "experiments": exps}, progress)
    rows = ctx["rows"].reset_index(drop=True)
    local = df["question_index"].to_numpy()
    df["question_index"] = rows["question_index"].to_numpy()[local]
    df["question"] = rows["question"].to_numpy()[local]
    df["text"] = [ctx["texts"][i] for i in local]
    df["answer"] = rows["answer_text"].to_numpy()[local]
    return df[patching.SWEEP_COLUMNS]


def coef_change(vanilla: str = models.DEFAULT_MODEL, unlearned=None, concepts="builtin", concept=None,
                prompt_format: str = "auto", questions: int | None = None, kind: str = "target", remote=False,
                progress: bool = True) -> pd.DataFrame:
    """How much unlearning changed each layer (cached, kind 'coef_change'): one row per (layer, quantity).

    quantity: 'coef' / 'attn' (MLP coefficients / attention states on the answer positions of the concept's
    questions), 'value' / 'key' / 'mlp' / 'layer' (weights); rel_change = ||unlearned - vanilla|| / ||vanilla||.
    Arguments as for sweep(). Columns: concept, kind, layer, quantity, norm_vanilla, norm_diff, rel_change, and the
    provenance columns of a sweep.
    """
    from .patching import change

    def compute(pair, tok, rows):
        return change.change(pair[0], pair[1], tok, _ids(rows.prompt_ids), _ids(rows.answer_ids), remote=remote)

    settings = {"kind": kind, "questions": questions, "alignment": "answer"}
    df, _ = _pair_table("coef_change", compute, vanilla, unlearned, concepts, concept, prompt_format, questions, kind,
                        remote, settings, progress)
    return df[["concept", "kind"] + change.CHANGE_COLUMNS + PROVENANCE_COLUMNS]


PROVENANCE_COLUMNS = ["vanilla_model", "unlearned_model", "unlearned_identity", "alignment", "prompt_format", "remote",
               "settings", "package_version", "torch_version", "transformers_version", "nnsight_version"]


def _patching_settings(window, layers, alignment, kind, direction, questions) -> dict:
    from . import patching

    if alignment not in patching.ALIGNMENTS:
        raise ValueError(f"unknown alignment {alignment!r}; valid: {', '.join(patching.ALIGNMENTS)}")
    if direction not in patching.DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; valid: {', '.join(patching.DIRECTIONS)}")
    if layers is None:
        patching.centred(1, window)  # validates the size
    elif isinstance(layers, int):
        layers = [layers]
    return {"window": window if layers is None else None, "layers": None if layers is None else list(layers),
            "alignment": alignment, "kind": kind, "direction": direction, "questions": questions}


def _pair_table(kind_name: str, compute, vanilla, unlearned, concepts, concept, prompt_format, questions, kind,
                remote, settings: dict, progress: bool):
    """Shared by sweep and coef_change: resolve the pair and the questions, then compute (cached) and add provenance.

    compute((vanilla_model, unlearned_model), tok, rows) -> DataFrame. Returns (table, context).
    """
    from . import patching

    if kind not in ("target", "unrelated"):
        raise ValueError(f"unknown kind {kind!r}; valid: target, unrelated")
    if questions is not None and (not isinstance(questions, int) or isinstance(questions, bool) or questions < 1):
        raise ValueError(f"questions must be a positive integer (use the first N questions), got {questions!r}")
    if not isinstance(vanilla, str):
        raise ValueError(f"vanilla must be a model name or checkpoint folder (str), got {type(vanilla).__name__}")
    _refuse_local(unlearned, remote)
    handle = _unlearned_handle(unlearned)
    if remote is True and handle["adapter"] is not None:
        patching.remote.preflight(vanilla)  # before any work (sweep has asked already; coef_change has not)
    cset = concepts if isinstance(concepts, concepts_mod.ConceptSet) else load_concepts(concepts)
    if concept is None:
        if len(cset) != 1:
            raise ValueError(f"concept: name the concept to use ({len(cset)} concepts in {cset.source}: "
                             f"{', '.join(cset.names[:10])}{' ...' if len(cset) > 10 else ''})")
        concept = 0
    c = cset.get(concept)
    tok = models.load_tokenizer(vanilla)
    fmt = prompts.resolve_format(prompt_format, tok)
    remote_answers = remote if handle["adapter"] is not None else False  # a remote study's own vanilla answers
    ans = answers(vanilla, concepts_mod.ConceptSet([c], cset.source), prompt_format=fmt,
                  include_unrelated=(kind == "unrelated"), progress=progress, remote=remote_answers)
    rows = ans[(ans.concept == c.label) & (ans.kind == kind)].sort_values("question_index")
    if kind == "target" and handle["config"] is not None:  # never a question the model was trained on
        rows = rows[rows.question_index.isin(scorable(handle["config"], c))]
    if questions is not None:
        rows = rows.head(questions)
    if rows.empty:
        raise ValueError(f"concept {c.label!r} has no {kind} questions"
                         + (" it was not trained on" if kind == "target" and handle["config"] is not None else ""))
    texts = [tok.decode(p + a) for p, a in zip(_ids(rows.prompt_ids), _ids(rows.answer_ids))]
    provenance = {
        "vanilla_model": vanilla, "unlearned_model": handle["label"],
        "unlearned_identity": cache.canonical_json(handle["identity"]) if handle["identity"] else None,
        "alignment": settings.get("alignment"), "prompt_format": fmt, "remote": str(remote),
        "settings": cache.canonical_json(settings), **_versions(),
    }

    def make_table():
        if remote and handle["adapter"] is not None:
            # remote=True / 'local': the vanilla model with the adapter applied inside the request; on NDIF the
            # vanilla model is NDIF's (built here on the meta device, nothing loaded)
            lm = hosted(vanilla, remote)[0].lm
            return compute((lm, handle["adapter"]()), tok, rows)
        v_model, v_tok = models.load(vanilla)
        u_model, u_tok = handle["load"]()
        if len(u_tok) != len(v_tok):
            raise ValueError(f"the unlearned model's tokenizer has {len(u_tok)} tokens, the vanilla one {len(v_tok)}: "
                             f"the vanilla answers cannot be fed to both")
        return compute((v_model, u_model), v_tok, rows)

    if handle["identity"] is None:  # an in-memory model: nothing to key a cache entry on
        u_model, _ = handle["load"]()
        table = compute((models.load(vanilla)[0], u_model), tok, rows)
    else:
        inputs = {"vanilla": models.identity(vanilla), "unlearned": handle["identity"], "concept": c.content_hash(),
                  "prompt_format": fmt, "remote": str(remote), "settings": settings}

        def build(folder: Path) -> None:
            tables.write_parquet(make_table(), folder / "table.parquet")

        table = pd.read_parquet(cache.get_or_build(kind_name, inputs, build) / "table.parquet")
    table = table.assign(concept=c.label, kind=kind, **provenance)
    return table, {"rows": rows, "texts": texts, "concept": c}


def _refuse_local(unlearned, remote) -> None:
    """remote=True with an unlearned model of this machine (not a hub id NDIF may host): refused before any work.
    An adapter run (params="lora") passes: its adapter travels with the request."""
    if remote is not True or getattr(unlearned, "is_adapter", False):
        return
    if isinstance(unlearned, (str, Path)):
        name = str(unlearned)
        # A hub id NDIF may host under that very name; a registry name or a folder is a model of this machine
        if not Path(name).expanduser().exists() and name not in models.REGISTRY:
            return
        what = name
    else:
        what = "made here (a handle or a loaded model)"
    from . import patching

    patching.refuse_local_model(remote, f"the unlearned model {what}")


def scorable(config, concept) -> list[int]:
    """The indices of `concept`'s questions a model unlearned with `config` may be scored on (not trained on)."""
    from .unlearning.config import scored_questions

    return scored_questions(config, len(concept.questions))


def _ids(column) -> list[list[int]]:
    """Token id lists from a parquet column (numpy arrays) as plain Python ints."""
    return [[int(t) for t in x] for x in column]


def _unlearned_handle(unlearned) -> dict:
    """{'label', 'identity' (None = do not cache), 'load'} for the three accepted forms of `unlearned`."""
    if unlearned is None:
        raise ValueError("unlearned: give the unlearned model (a model name or checkpoint folder, a handle from "
                         "pipeline.unlearned, or a loaded (model, tokenizer) tuple)")
    if isinstance(unlearned, (str, Path)):
        name = str(unlearned)
        return {"label": name, "identity": models.identity(name), "load": lambda: models.load(name), "config": None,
                "adapter": None}
    if isinstance(unlearned, tuple) and len(unlearned) == 2:
        model, tok = unlearned
        label = getattr(getattr(model, "config", None), "_name_or_path", "") or "<in-memory model>"
        return {"label": f"{label} (in memory)", "identity": None, "load": lambda: (model.eval(), tok),
                "config": None, "adapter": None}
    if callable(getattr(unlearned, "load", None)) and callable(getattr(unlearned, "identity", None)):
        parts = [str(getattr(unlearned, a)) for a in ("model", "concept", "method") if getattr(unlearned, a, None)]
        # Patching and the change measure restore whatever they change (patching.restore): the kept model, uncopied
        load = unlearned.load
        if "shared" in inspect.signature(load).parameters:
            load = functools.partial(load, shared=True)
        # A model unlearned here says what it trained on: its scores leave those questions out
        return {"label": "/".join(parts) or type(unlearned).__name__, "identity": unlearned.identity(),
                "load": load, "config": getattr(unlearned, "config", None),
                "adapter": unlearned.adapter if getattr(unlearned, "is_adapter", False) else None}
    raise ValueError(f"unlearned: expected a model name or checkpoint folder, a handle with .load() and "
                     f".identity(), or a (model, tokenizer) tuple; got {type(unlearned).__name__}")


def _versions() -> dict:
    from .versions import versions

    v = versions()
    return {"package_version": v["dissect-unlearning"], "torch_version": v["torch"],
            "transformers_version": v["transformers"], "nnsight_version": v["nnsight"]}


# text_concept: whose text the 'unrelated' relearning trained on (or the never-known concept whose questions the
# control trained on); leaked_answers: how many of the target's questions that text answers (0 unless no candidate was
# clean); answer_overlap: the share of the answers' words in it; questions / per_question: the scored questions'
# indices and each one's score, in that order (what the verdicts resample); vanilla: the vanilla model's score on the
# same questions (1 for ROUGE-L against its own answers; for the never-known control, the "never knew" check).
RELEARN_COLUMNS = ["model", "concept", "method", "data", "step", "split", "metric", "value", "n", "settings",
                   "text_concept", "leaked_answers", "answer_overlap", "questions", "per_question", "vanilla"]
RELEARN_ANSWER_TOKENS = 30  # the length of the answers scored at each relearning checkpoint


def relearn(model: str = models.DEFAULT_MODEL, concepts="builtin", concept: str | int = 0, method: str = "grad_diff",
            steps=(0, 1, 2, 4, 8), data: str = "unrelated", lr: float = 1e-5, batch_size: int = 4,
            prompt_format: str = "auto", settings: dict | None = None, progress: bool = True,
            never_known=None, remote=False) -> pd.DataFrame:
    """Scores of an unlearned model after k steps of plain fine-tuning on other data (cached).

    data='unrelated': the text of a concept neither forgotten nor retained, which gives away none of the target's
    answers (unlearning.relearn.leaks; the columns text_concept, leaked_answers, answer_overlap say which text and
    what it shares); scored on all target questions.
    data='partial': the first half of the target questions with vanilla answers; scored on the other half.
    data='never_known': the control of 'partial' - the same unlearned model, steps, lr, batch size and seed, trained
    on the first half of a never-known concept's questions (as many as the target has; concepts.never_known, or the
    JSON file `never_known`) with its gold answers, scored on the other half against them (split 'never_known';
    ROUGE-L against the best of the accepted answers).
    One row per (step, metric in {rougeL (vs vanilla answer), accuracy (vs expected, where known)}); step 0 = the
    unlearned model itself. `settings` (a dict) choose the unlearned model, as in `unlearned`; lr and batch_size
    are the relearning fine-tune's. Columns: RELEARN_COLUMNS.
    remote: the place the unlearned model was made in (see unlearned); relearning itself fine-tunes every weight of
    the model, which NDIF's frozen weights do not allow, so remote=True is refused (RemoteLocalModelError) and
    remote="local" relearns the adapter model's merged weights here, starting from the same vanilla answers.
    """
    from .unlearning import relearn as relearn_mod

    if remote is True:
        from . import patching

        raise patching.RemoteLocalModelError(
            "relearn: relearning fine-tunes every weight of the unlearned model, which NDIF's frozen, shared weights "
            "do not allow; use remote=False or 'local' (it then runs here, on the adapter merged into the weights)")
    kinds = (*relearn_mod.KINDS, relearn_mod.CONTROL)
    if data not in kinds:
        raise ValueError(f"relearning data must be one of {kinds}, got {data!r}")
    if not (isinstance(steps, (list, tuple, range)) and steps
            and all(validate.int_in_range(k, 0, 1000) for k in steps)):
        raise ValueError(f"steps must be a non-empty list of step counts from 0 to 1000, got {steps!r}")
    if not (validate.is_number(lr) and 0 < lr < 1):
        raise ValueError(f"lr must be a finite number in (0, 1), got {lr!r}")
    validate.check_int(batch_size, "batch_size", 1)
    cset = concepts if isinstance(concepts, concepts_mod.ConceptSet) else load_concepts(concepts)
    target = cset.get(concept)
    fmt = prompts.resolve_format(prompt_format, models.load_tokenizer(model))
    u = unlearned(model, cset, target.label, method, progress=progress, remote=remote,
                  **{"prompt_format": fmt, **(settings or {})})
    retain = cset.get(u.retain_concept)
    others = [c for c in cset if c.name not in (target.name, retain.name)]
    van = answers(model, concepts_mod.ConceptSet([target], cset.source), prompt_format=fmt,
                  max_new_tokens=u.config.max_new_tokens, include_unrelated=False, progress=progress, remote=remote)
    van = van[van.kind == "target"].sort_values("question_index")
    other, leak, control = None, None, None
    if data == "unrelated":  # a text that gives away none of the target's answers (see relearn_mod.leaks)
        other, leak = relearn_mod.unrelated_concept(target, others, list(van.answer_text))
    if data == relearn_mod.CONTROL:  # as many questions as the target, so that both train on as many
        control = concepts_mod.never_known(len(target.questions), never_known)
    qa = [(q, list(p), list(a)) for q, p, a in zip(van.question, van.prompt_ids, van.answer_ids)]
    inputs = {"unlearned": u.identity(), "data": data, "steps": sorted(set(int(k) for k in steps)), "lr": lr,
              "batch_size": batch_size, "other": other.content_hash() if other else None,
              "never_known": control.content_hash() if control else None}
    if control is not None:  # the vanilla model's answers to the control's questions, scored against the gold ones
        cv = answers(model, concepts_mod.ConceptSet([control], control.source), prompt_format=fmt,
                     max_new_tokens=RELEARN_ANSWER_TOKENS, include_unrelated=False, progress=progress,
                     remote=remote)
        vanilla_texts = list(cv[cv.kind == "target"].sort_values("question_index").answer_text)
        references, accepted, split = control.answers, control.answers, relearn_mod.CONTROL
    else:
        vanilla_texts = list(van.answer_text)
        references, accepted, split = [[t] for t in vanilla_texts], target.answers, "target"

    def build(folder: Path) -> None:
        m, tok = u.load()
        if control is not None:  # the unlearned model never saw these questions: every held-out one is scored
            train, scored = relearn_mod.never_known_examples(tok, control, fmt, u.config.max_length)
            questions = [control.questions[i] for i in scored]
        else:
            train, scored = relearn_mod.examples(tok, data, target, other, qa, u.config.chunk_tokens,
                                                 u.config.max_length)
            allowed = set(scorable(u.config, target))  # never a question unlearning trained on
            scored = [i for i in scored if i in allowed]
            questions = [target.questions[i] for i in scored]

        def evaluate(m, k):
            texts = [a.answer_text for a in prompts.generate_answers(m, tok, questions, fmt, RELEARN_ANSWER_TOKENS,
                                                                     16)]
            return [{**r, "questions": scored} for r in relearn_scores(texts, scored, references, accepted, split)]

        rows = relearn_mod.relearn(m, tok, train, inputs["steps"], evaluate, lr=lr, batch_size=batch_size,
                                   seed=u.config.seed, progress=progress)
        tables.write_parquet(pd.DataFrame(rows), folder / "relearn.parquet")

    df = pd.read_parquet(cache.get_or_build("relearn", inputs, build) / "relearn.parquet")
    df = df.assign(questions=df["questions"].map(lambda x: [int(i) for i in x]),
                   per_question=df["per_question"].map(lambda x: [float(v) for v in x]))
    scored = df["questions"].iloc[0] if len(df) else []
    vanilla = {r["metric"]: r["value"] for r in relearn_scores([vanilla_texts[i] for i in scored], scored, references,
                                                               accepted, split)}
    df = df.assign(model=model, concept=target.label, method=u.label, data=data,
                   settings=cache.canonical_json(u.settings),
                   text_concept=other.label if other else control.label if control else None,
                   leaked_answers=len(leak["leaked"]) if leak else None,
                   answer_overlap=leak["overlap"] if leak else float("nan"), vanilla=df["metric"].map(vanilla))
    return df[RELEARN_COLUMNS]


def relearn_scores(texts: list[str], scored: list[int], references, accepted, split: str) -> list[dict]:
    """The rows of one relearning checkpoint: the answers `texts` to the questions `scored` (indices), scored by
    ROUGE-L against the best of each question's references (references[i]: a list of texts) and, where `accepted`
    answers are known, by accuracy; each row keeps the per-question scores (per_question, in the order of scored)."""
    from . import metrics

    rouge = [max(metrics.rouge_l(t, r) for r in references[i]) for t, i in zip(texts, scored)]
    rows = [{"split": split, "metric": "rougeL", "value": metrics.mean(rouge), "n": len(rouge), "per_question": rouge}]
    if accepted:
        acc = [metrics.accuracy(t, accepted[i]) for t, i in zip(texts, scored)]
        rows.append({"split": split, "metric": "accuracy", "value": metrics.mean(acc), "n": len(acc),
                     "per_question": acc})
    return rows
