"""A study: one chapter's parameters and every computation the chapter asks for, behind one object.

A chapter notebook builds a study from its parameters and asks it for tidy tables:

    study = Study.from_params(globals())           # picks the parameters it knows, ignores the rest
    sweep = study.sweeps(["coef", "attn", "coef+attn"])
    scores = study.behaviour()

Each call loops over the study's (concept, method) pairs, calls the cached pipeline stage for each pair, and returns
one table with `concept`, `method` and `seed` columns. The same calls in *plan* mode (inside `planning()`) record a
`Request` per stage instead of computing it and return empty tables with the right columns, so the notebook's own
code is the plan: the precompute stage runs a chapter's cells tagged `study` in plan mode and schedules exactly the
requests they record, through the same `Study.execute`, hence with the same cache keys.

`from_params` checks every parameter first (`Study.check`): against the others, the concept set and the model's
layer count (read from its config), so that a bad value fails in a line before any model is loaded or trained.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import pandas as pd

from . import cache, concepts as concepts_mod, models, pipeline, validate

# The parameters a study reads (a chapter declares the ones it uses; the others keep these defaults).
DEFAULTS: dict = {
    "model": models.DEFAULT_MODEL, "concept_set": "builtin", "concepts": "all", "n_questions": None,
    "n_unrelated": None, "prompt_format": "auto", "max_new_tokens": 30, "methods": ["grad_diff"], "unlearning": {},
    "window": 5, "layers": None, "alignment": "answer", "remote": False, "device": None, "dtype": None,
    "beyond_concepts": None, "relearn_steps": [0, 2, 4, 8], "relearn_data": ["unrelated", "partial"],
    "relearn_lr": 1e-5, "second_model": None, "second_concepts": None, "second_methods": None, "seeds": [0],
    "adapter_unlearning": None,
}
# The parameters that decide what an unlearned model is (with the model, concept and method): requests that agree
# on them share the unlearned model, so the precompute stage groups them into one task.
CONTEXT = ("concept_set", "n_questions", "n_unrelated", "prompt_format", "unlearning", "device", "dtype")
STAGES = ("answers", "unlearned", "behaviour", "sweep", "coef_change", "relearn")

TRAINING_COLUMNS = ["concept", "method", "seed", "step", "forget_loss", "retain_loss", "loss", "lr", "grad_norm",
                    "seconds", "train_seconds"]
_PAIR_COLUMNS = ["method", "seed"]


@dataclass(frozen=True)
class Request:
    """One cached stage of one (model, concept, method), with every option spelled out."""

    stage: str
    model: str
    concept: str | None
    method: str | None
    options: tuple  # sorted (name, value) pairs; values as canonical JSON so that requests compare and hash
    context: str  # canonical JSON of the CONTEXT parameters

    @property
    def kwargs(self) -> dict:
        import json

        return {k: json.loads(v) for k, v in self.options}

    @property
    def params(self) -> dict:
        import json

        return {"model": self.model, **json.loads(self.context)}


_PLAN: list[Request] | None = None  # the recorder of the innermost planning() block


@contextlib.contextmanager
def planning() -> Iterator[list[Request]]:
    """Inside the block, studies built by from_params record their requests (into the yielded list) instead of
    computing them, and return empty tables."""
    global _PLAN
    outer, _PLAN = _PLAN, []
    try:
        yield _PLAN
    finally:
        _PLAN = outer


@dataclass
class Study:
    params: dict
    plan: list | None = None  # the request recorder in plan mode, None when computing
    progress: bool = True
    _cset: concepts_mod.ConceptSet | None = field(default=None, repr=False)

    @classmethod
    def from_params(cls, params: Mapping | None = None, *, progress: bool = True, **overrides) -> "Study":
        """A study from a chapter's parameter values (a notebook passes `globals()`: names a study does not read
        are ignored). Outside plan mode this also puts every model of the study on the chapter's device/dtype."""
        values = {k: v for k, v in {**(params or {}), **overrides}.items() if k in DEFAULTS}
        study = cls({**DEFAULTS, **values}, plan=_PLAN, progress=progress).check()
        if study.plan is None:
            models.set_runtime(study.params["device"], study.params["dtype"])
        return study

    def check(self, *, offline: bool = False) -> "Study":
        """Check every parameter before anything is computed; return the study, or raise an error that names the
        parameter: a ValueError (a ConceptDataError among them), a models.ModelError or a
        patching.RemoteUnavailableError.

        Each value on its own, then against the others, the concept set (it loads, and every selection is in it)
        and the model: window and layers must fit its layer count (models.n_layers_of reads the config, no weights),
        the unlearning settings must make a valid UnlearnConfig for every method. remote=True needs a model NDIF hosts
        under a hub id, and asks NDIF (preflight: key, model running, nnsight version) unless offline; each stage that
        reads an unlearned model then needs adapter unlearning (unlearning: {params: lora}: the adapter travels with
        NDIF's requests; weights changed here could not: patching.RemoteLocalModelError), checked when it is asked.
        offline=True leaves out what needs the network or a credential (a hub concept set, the NDIF key): the book
        checks each chapter's values that way when it plans a build, and the chapter checks them all when it runs.
        """
        from . import patching, prompts, unlearning
        from .unlearning.relearn import KINDS as RELEARN_DATA

        p = self.params
        validate.check_int(p["max_new_tokens"], "max_new_tokens", 1)
        for name, lo in (("n_questions", 1), ("n_unrelated", 0)):
            if p[name] is not None:
                validate.check_int(p[name], name, lo)
        _check_choice(p["prompt_format"], "prompt_format", ("auto", *prompts.FORMATS))
        _check_choice(p["alignment"], "alignment", patching.ALIGNMENTS)
        validate.check_device(p["device"])
        validate.check_dtype(p["dtype"])
        for name in ("methods", "second_methods"):
            chosen = p[name]
            if name == "second_methods" and chosen is None:
                continue
            if not isinstance(chosen, (list, tuple)) or not chosen:
                raise ValueError(f"{name} must be a non-empty list of: {', '.join(unlearning.METHODS)}; got {chosen!r}")
            for m in chosen:
                _check_choice(m, name, tuple(unlearning.METHODS))
        if not isinstance(p["unlearning"], Mapping):
            raise ValueError(f"unlearning must be a mapping of unlearning settings, got {p['unlearning']!r}")
        for m in dict.fromkeys([*p["methods"], *(p["second_methods"] or [])]):
            try:
                unlearning.UnlearnConfig.for_method(m, **p["unlearning"])
            except ValueError as exc:
                raise ValueError(f"unlearning ({m}): {exc}") from None
        if p["adapter_unlearning"] is not None:
            if not isinstance(p["adapter_unlearning"], Mapping):
                raise ValueError(f"adapter_unlearning must be null or a mapping of unlearning settings, got "
                                 f"{p['adapter_unlearning']!r}")
            try:
                unlearning.UnlearnConfig.for_method(p["methods"][0], **self._adapter_settings())
            except ValueError as exc:
                raise ValueError(f"adapter_unlearning: {exc}") from None
        steps = p["relearn_steps"]
        if not isinstance(steps, (list, tuple)) or not steps:
            raise ValueError(f"relearn_steps must be a non-empty list of step counts, got {steps!r}")
        for k in steps:
            validate.check_int(k, "relearn_steps", 0, 1000)
        if not isinstance(p["relearn_data"], (list, tuple)):
            raise ValueError(f"relearn_data must be a list of: {', '.join(RELEARN_DATA)}; got {p['relearn_data']!r}")
        for d in p["relearn_data"]:
            _check_choice(d, "relearn_data", RELEARN_DATA)
        seeds = p["seeds"]
        if not (isinstance(seeds, (list, tuple)) and seeds and all(validate.int_in_range(x, 0) for x in seeds)
                and len(set(seeds)) == len(seeds)):
            raise ValueError(f"seeds must be a non-empty list of distinct integers >= 0, got {seeds!r}")
        if not (validate.is_number(p["relearn_lr"]) and 0 < p["relearn_lr"] < 1):
            raise ValueError(f"relearn_lr must be a finite number in (0, 1), got {p['relearn_lr']!r}")
        _check_remote(p, offline)
        for name in ("model", "second_model"):
            if not (isinstance(p[name], str) and p[name].strip()) and not (name == "second_model" and p[name] is None):
                raise ValueError(f"{name} must be a registry name, a checkpoint folder or a hub id, got {p[name]!r}")
        for model in dict.fromkeys([p["model"], *([p["second_model"]] if p["second_model"] else [])]):
            n_layers = models.n_layers_of(model)  # None: unknown without the network; the load will tell
            try:
                validate.check_window(p["window"], n_layers if p["layers"] is None else None)  # layers replace it
                validate.check_layers(p["layers"], n_layers)
            except ValueError as exc:
                raise ValueError(f"{exc} (model {model!r})" if n_layers else str(exc)) from None
        if not (offline and str(p["concept_set"]).startswith(concepts_mod.HUB_PREFIX)):
            for name in ("concepts", "beyond_concepts", "second_concepts"):
                if p[name] is None or (name == "second_concepts" and not p["second_model"]):
                    continue
                try:
                    self.concept_set.select(p[name])
                except concepts_mod.ConceptDataError:
                    raise
                except (KeyError, ValueError) as exc:
                    raise ValueError(f"{name}: {exc.args[0] if exc.args else exc}") from None
        return self

    # ---------------------------------------------------------------------------------------------------------------
    # What the study is about
    # ---------------------------------------------------------------------------------------------------------------
    @property
    def model(self) -> str:
        return self.params["model"]

    @property
    def concept_set(self) -> concepts_mod.ConceptSet:
        if self._cset is None:
            p = self.params
            self._cset = concepts_mod.concept_set(p["concept_set"], p["n_questions"], p["n_unrelated"])
        return self._cset

    @property
    def concepts(self) -> list[str]:
        return self.concept_set.select(self.params["concepts"]).names

    @property
    def methods(self) -> list[str]:
        return list(self.params["methods"])

    def pairs(self, scope: str = "all") -> list[tuple[str, str]]:
        """(concept, method) pairs: 'all' = every chosen concept with every method; 'beyond' = the concepts of
        `beyond_concepts` (all chosen ones when unset), which the experiments beyond the paper use."""
        if scope == "all":
            names = self.concepts
        elif scope == "beyond":
            beyond = self.params["beyond_concepts"]
            names = self.concept_set.select(beyond).names if beyond else self.concepts
        else:
            raise ValueError(f"pairs: unknown scope {scope!r}; valid: all, beyond")
        return [(c, m) for c in names for m in self.methods]

    def runs(self, scope: str = "all") -> list[tuple[str, str, int]]:
        """(concept, method, seed) of every unlearned model in `scope`: each seed of `seeds` for the pairs of
        beyond_concepts (the concepts studied in depth), the first seed for the others."""
        seeds = list(self.params["seeds"])
        deep = {c for c, _ in self.pairs("beyond")}
        return [(c, m, s) for c, m in self.pairs(scope) for s in (seeds if c in deep else seeds[:1])]

    def second_family(self) -> "Study | None":
        """The same study on `second_model` (its own concepts and methods when set), or None when unset."""
        p = self.params
        if not p["second_model"]:
            return None
        concepts = p["second_concepts"] if p["second_concepts"] else self.concepts
        return self._variant(model=p["second_model"], concepts=concepts, methods=p["second_methods"] or p["methods"])

    def with_forget_data(self, forget_data: str) -> "Study":
        """The same study on the first seed, its models unlearned with `forget_data` ("text", "qa" or "text+qa";
        see UnlearnConfig): the regimes side by side. The study's own regime asks for exactly its own requests."""
        from .unlearning.config import FORGET_DATA, UnlearnConfig

        _check_choice(forget_data, "forget_regimes", FORGET_DATA)
        p = self.params
        unlearning = dict(p["unlearning"])
        if forget_data != unlearning.get("forget_data", UnlearnConfig.forget_data):
            unlearning["forget_data"] = forget_data
        return self._variant(unlearning=unlearning, seeds=list(p["seeds"])[:1])

    def control(self) -> "Study":
        """The same study with the control fine-tune (unlearning/control.py) as its only method, first seed only: a
        model trained as the unlearned ones were but on an unrelated concept's text, for a chapter to hold its
        findings against ("would any fine-tune do that too?"). The study's unlearning settings apply (the same
        optimiser and steps), except that the control's forget data is text whatever the study's forget_data."""
        p = self.params
        return self._variant(methods=["control"], seeds=list(p["seeds"])[:1],
                             unlearning={**p["unlearning"], "forget_data": "text"})

    def with_adapter(self) -> "Study | None":
        """The comparison of full fine-tuning with a low-rank adapter: the first (concept, method) of
        beyond_concepts, first seed, unlearned as an adapter (params "lora") with the study's unlearning settings and
        `adapter_unlearning` over them. None when adapter_unlearning is unset or the study's own models are
        adapters already (nothing to compare them with)."""
        p = self.params
        if p["adapter_unlearning"] is None or p["unlearning"].get("params") == "lora":
            return None
        concept, method = self.pairs("beyond")[0]
        return self._variant(concepts=[concept], beyond_concepts=None, methods=[method], seeds=list(p["seeds"])[:1],
                             unlearning=self._adapter_settings())

    def adapter_sweeps(self, experiments) -> pd.DataFrame | None:
        """with_adapter()'s sweeps of `experiments` (the adapter's KRS curves, to set beside the study's own), or
        None when there is no comparison in these parameters."""
        adapter = self.with_adapter()
        return adapter.sweeps(experiments) if adapter is not None else None

    def _adapter_settings(self) -> dict:
        return {**self.params["unlearning"], **(self.params["adapter_unlearning"] or {}), "params": "lora"}

    def _variant(self, **changes) -> "Study":
        """This study with some parameters changed (and no second model), recording into the same plan."""
        return Study({**self.params, **changes, "second_model": None}, plan=self.plan, progress=self.progress,
                     _cset=self._cset)

    @property
    def context(self) -> str:
        return self._context(None)

    def _context(self, seed: int | None) -> str:
        """The CONTEXT parameters as canonical JSON; a run's seed, when it is not the settings' own, joins its
        unlearning settings (so each seed is an unlearned model, and a task, of its own)."""
        values = {k: self.params[k] for k in CONTEXT}
        if self.params["remote"]:  # where the unlearned models are trained and the vanilla answers generated
            values["remote"] = self.params["remote"]
        if seed is not None and seed != values["unlearning"].get("seed", 0):
            values["unlearning"] = {**values["unlearning"], "seed": seed}
        return cache.canonical_json(values)

    # ---------------------------------------------------------------------------------------------------------------
    # The tables a chapter asks for
    # ---------------------------------------------------------------------------------------------------------------
    def answers(self, include_unrelated: bool = True) -> pd.DataFrame:
        """The vanilla model's greedy answers to the chosen concepts' questions (pipeline.ANSWER_COLUMNS)."""
        return self._call("answers", None, None, select=self.concepts, include_unrelated=include_unrelated,
                          max_new_tokens=self.params["max_new_tokens"], empty=pipeline.ANSWER_COLUMNS)

    def unlearned(self, concept: str, method: str, seed: int | None = None):
        """The unlearned model of (concept, method) with `seed` (default: the first of `seeds`): pipeline.unlearned's
        handle (.load() -> (model, tokenizer), .config, ...); None in plan mode, where the request is recorded."""
        return self._call("unlearned", concept, method, seed=self.params["seeds"][0] if seed is None else seed)

    def training(self, scope: str = "all") -> pd.DataFrame:
        """The loss curve of every unlearning run (TRAINING_COLUMNS; train_seconds = the run's training time)."""
        frames = []
        for c, m, seed in self.runs(scope):
            u = self._call("unlearned", c, m, seed=seed)
            if u is not None:
                frames.append(u.loss_curve.assign(concept=c, method=m, seed=u.config.seed,
                                                  train_seconds=u.train_seconds))
        return _concat(frames, TRAINING_COLUMNS)

    def behaviour(self, scope: str = "all") -> pd.DataFrame:
        """Behavioural scores before and after unlearning (pipeline.BEHAVIOUR_COLUMNS + seed)."""
        return self._pairs_table("behaviour", scope, pipeline.BEHAVIOUR_COLUMNS)

    def sweeps(self, experiments, scope: str = "all", *, kind: str = "target", direction: str = "forward",
               window: int | None = None, layers=...) -> pd.DataFrame:
        """A patching / restoration sweep of every pair (patching.SWEEP_COLUMNS + method, seed). window and layers
        default to the study's parameters (leave layers out); layers=[-1] patches the last layer alone, None slides
        the window over every layer."""
        from . import patching

        window = self.params["window"] if window is None else window
        layers = self.params["layers"] if layers is ... else layers
        n_layers = models.n_layers_of(self.model)  # this call's own window and layers, checked as check() does
        validate.check_window(window, n_layers if layers is None else None)
        validate.check_layers(layers, n_layers)
        patching.experiments.get(experiments)  # known experiments (remote ones: every kind runs as adapter terms)
        return self._pairs_table(
            "sweep", scope, patching.SWEEP_COLUMNS, experiments=list(experiments), window=window, layers=layers,
            alignment=self.params["alignment"], remote=self.params["remote"], kind=kind, direction=direction)

    def coef_change(self, scope: str = "all") -> pd.DataFrame:
        """How much unlearning changed each layer's activations and weights (pipeline.coef_change + method, seed)."""
        from .patching import change

        columns = ["concept", "kind"] + change.CHANGE_COLUMNS + pipeline.PROVENANCE_COLUMNS
        return self._pairs_table("coef_change", scope, columns, remote=self.params["remote"])

    def relearn(self, scope: str = "beyond") -> pd.DataFrame:
        """Target scores after k steps of relearning, for every relearning data kind of the parameters."""
        p = self.params
        if p["relearn_data"]:
            _refuse_remote_relearning(p["remote"])
        frames = [self._pairs_table("relearn", scope, pipeline.RELEARN_COLUMNS, steps=sorted(set(p["relearn_steps"])),
                                    data=d, lr=p["relearn_lr"])
                  for d in p["relearn_data"]]
        return _concat(frames, pipeline.RELEARN_COLUMNS + ["seed"])

    def relearn_control(self, scope: str = "beyond") -> pd.DataFrame:
        """The never-known control of 'partial' relearning (pipeline.relearn, data 'never_known'): each unlearned
        model of `scope` fine-tuned with the same steps, learning rate, batch and seed on half of a fictional
        concept's questions, scored on the other half. Empty (the same columns) unless 'partial' is in relearn_data."""
        from .unlearning.relearn import CONTROL

        p = self.params
        if "partial" not in p["relearn_data"]:
            return pd.DataFrame(columns=pipeline.RELEARN_COLUMNS + ["seed"])
        _refuse_remote_relearning(p["remote"])
        return self._pairs_table("relearn", scope, pipeline.RELEARN_COLUMNS, steps=sorted(set(p["relearn_steps"])),
                                 data=CONTROL, lr=p["relearn_lr"])

    # ---------------------------------------------------------------------------------------------------------------
    # Plan or compute
    # ---------------------------------------------------------------------------------------------------------------
    def _pairs_table(self, stage: str, scope: str, columns: list, **options) -> pd.DataFrame:
        frames = []
        for c, m, seed in self.runs(scope):
            table = self._call(stage, c, m, seed=seed, **options)
            if table is not None:
                frames.append(table)
        return _concat(frames, list(dict.fromkeys(columns + _PAIR_COLUMNS)))

    def _call(self, stage: str, concept, method, empty=None, seed: int | None = None, **options):
        if stage != "answers":
            _refuse_weights_on_ndif(self.params)
        request = Request(stage, self.model, concept, method,
                          tuple(sorted((k, cache.canonical_json(v)) for k, v in options.items())), self._context(seed))
        if self.plan is not None:
            if request not in self.plan:
                self.plan.append(request)
            return None if empty is None else pd.DataFrame(columns=empty)
        return self.execute(request)

    def execute(self, request: Request):
        """Compute one request (cached): the only place where a study calls the pipeline."""
        p, kw = self.params, request.kwargs
        fmt, cset = p["prompt_format"], self.concept_set
        unlearning = request.params["unlearning"]  # the study's settings, with the run's seed
        # Where the models run: an adapter study with remote True / "local" trains, answers and scores in nnsight
        # requests; a study of weights unlearned here runs only its traces that way (remote "local")
        place = p["remote"] if unlearning.get("params") == "lora" or p["remote"] is True else False
        if request.stage == "answers":
            return pipeline.answers(request.model, cset, select=kw["select"], prompt_format=fmt,
                                    max_new_tokens=kw["max_new_tokens"], include_unrelated=kw["include_unrelated"],
                                    progress=self.progress, remote=place)
        u = pipeline.unlearned(request.model, cset, request.concept, request.method, progress=self.progress,
                               prompt_format=fmt, remote=place, **unlearning)
        if request.stage == "unlearned":
            return u
        if request.stage == "behaviour":
            table = pipeline.behaviour(request.model, cset, select=[request.concept], methods=[request.method],
                                       prompt_format=fmt, settings=unlearning, progress=self.progress, remote=place)
        elif request.stage == "sweep":
            table = pipeline.sweep(request.model, u, cset, request.concept, prompt_format=fmt,
                                   progress=self.progress, **kw).assign(method=request.method)
        elif request.stage == "coef_change":
            table = pipeline.coef_change(request.model, u, cset, request.concept, prompt_format=fmt,
                                         progress=self.progress, **kw).assign(method=request.method)
        elif request.stage == "relearn":
            table = pipeline.relearn(request.model, cset, request.concept, request.method, prompt_format=fmt,
                                     settings=unlearning, progress=self.progress, remote=place, **kw)
        else:
            raise ValueError(f"unknown study stage {request.stage!r}; valid: {', '.join(STAGES)}")
        return table.assign(seed=u.config.seed)


def check_params(params: Mapping, *, offline: bool = False) -> None:
    """Study.check on a chapter's parameter values (the others take DEFAULTS), without building the study."""
    Study({**DEFAULTS, **{k: v for k, v in params.items() if k in DEFAULTS}}, plan=[]).check(offline=offline)


def _check_remote(p: dict, offline: bool) -> None:
    """remote=True: every model of the study must travel with NDIF's requests, as the hosted model plus an adapter."""
    from . import patching

    remote = p["remote"]
    if remote not in patching.REMOTE_CHOICES:
        raise ValueError(f"remote must be False, True (run on NDIF) or 'local' (nnsight's offline simulation of an "
                         f"NDIF request), got {remote!r}")
    if remote is not True:
        return
    for name in ("model", "second_model"):
        if p[name]:
            try:
                patching.remote.hosted_name(p[name])
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
    if not offline:
        patching.remote.preflight(p["model"])  # key, model running, nnsight version: one message, before any work


def _refuse_weights_on_ndif(p: dict) -> None:
    """remote=True and a stage that reads an unlearned model: it must be an adapter (checked when the stage is asked
    for, so that a chapter of vanilla answers alone needs no unlearning settings)."""
    from . import patching

    if p["remote"] is True and p["unlearning"].get("params") != "lora":
        raise patching.RemoteLocalModelError(
            "remote=True needs adapter unlearning (unlearning: {params: lora}): NDIF runs the weights it hosts, so "
            "an unlearned model whose weights were changed here would run there as the vanilla model, and every KRS "
            "would compare the vanilla model with itself. An adapter travels with each request instead; got "
            f"params={p['unlearning'].get('params', 'full')!r}")


def _refuse_remote_relearning(remote) -> None:
    from . import patching

    if remote is True:
        raise patching.RemoteLocalModelError(
            "relearn_data: relearning fine-tunes every weight of the unlearned model, which NDIF's frozen, shared "
            "weights do not allow; with remote=True set relearn_data to [] (the ndif profile does), or run the "
            "relearning chapter with remote=False or 'local'")


def _check_choice(value, name: str, options) -> None:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(options)}")


def _concat(frames: list, columns: list) -> pd.DataFrame:
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)
