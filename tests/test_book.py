"""The book: parameters and profiles, failure reporting, the smoke build end to end, and the pages in a browser."""
import json
import re
import shutil
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
import yaml

from dissect_unlearning import book, cache, cli, concepts, precompute, unlearning, validate
from dissect_unlearning.patching import experiments

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_PROFILES = {"default", "smoke", "paper", "gemma", "ndif"}


# ------------------------------------------------------------------------------------------------------------------
# A throw-away project: the real config and pages, one chapter written by the test
# ------------------------------------------------------------------------------------------------------------------
def make_project(tmp_path: Path, cells, name="01_probe") -> Path:
    root = tmp_path / "project"
    (root / "notebooks").mkdir(parents=True)
    (root / "profiles").mkdir()
    shutil.copy(ROOT / "_config.yml", root / "_config.yml")
    shutil.copytree(ROOT / "book", root / "book", ignore=shutil.ignore_patterns("_executed", "__pycache__"))
    (root / "_toc.yml").write_text(yaml.safe_dump({"format": "jb-book", "root": "book/intro",
                                                   "chapters": [{"file": f"notebooks/{name}"}]}))
    (root / "profiles" / "p.yml").write_text("description: test\nparameters: {seed: 3}\n")
    nb = nbformat.v4.new_notebook()
    for kind, src, *tags in cells:
        cell = nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
        if tags:
            cell.metadata["tags"] = tags
        nb.cells.append(cell)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, root / "notebooks" / f"{name}.ipynb")
    return root


PARAMS = ("code", "seed = 0  # random seed: an integer, at least 0", "parameters")


# ------------------------------------------------------------------------------------------------------------------
# Parameters, profiles, -p (no execution)
# ------------------------------------------------------------------------------------------------------------------
def test_every_chapter_documents_its_parameters_and_every_profile_is_valid():
    chapters = book.chapters(ROOT)
    assert chapters and all(ch.in_toc for ch in chapters if ch.stem.startswith("02_"))
    for ch in chapters:
        book.check_documented(ch)  # in the schema, commented, default allowed
        assert all(len(p.help) > 15 for p in ch.parameters().values()), ch.stem
    assert REQUIRED_PROFILES <= set(book.profile_names(ROOT))
    for name in book.profile_names(ROOT):
        prof = book.load_profile(name, ROOT)
        assert prof.description
        for ch in chapters:
            book.resolve_parameters(ch, prof)  # the ndif profile too: its adapter study passes the offline checks
    default = book.load_profile("default", ROOT).parameters
    assert default["model"] == "smollm2-135m"
    assert isinstance(default["concepts"], list) and len(default["concepts"]) >= 5
    assert {"grad_diff", "dpo", "npo"} <= set(default["methods"])
    ndif = book.load_profile("ndif", ROOT)
    assert ndif.parameters["remote"] is True and ndif.parameters["unlearning"]["params"] == "lora"
    assert not ndif.chapters  # every chapter runs remotely (restorations are adapter terms switched off)


def test_profile_concepts_exist_in_the_shipped_set():
    from dissect_unlearning import concepts

    shipped = concepts.load("builtin")
    for name in ("default", "smoke", "gemma"):
        for c in book.load_profile(name, ROOT).parameters["concepts"]:
            shipped.get(c)  # raises KeyError naming the concept


@pytest.mark.parametrize("text, expected", [
    ("window=3", ("window", 3)), ("remote=true", ("remote", True)), ("layers=null", ("layers", None)),
    ("methods=[grad_diff, dpo]", ("methods", ["grad_diff", "dpo"])), ("model=a/b", ("model", "a/b")),
    ("concepts=Harry Potter", ("concepts", "Harry Potter")),
])
def test_command_line_values_are_read_as_yaml(text, expected):
    assert book.parse_assignment(text) == expected


def test_bad_parameter_name_lists_the_valid_names(capsys):
    rc = cli.main(["run", "model_organism", "--profile", "smoke", "-p", "modle=gemma3-270m"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "no parameter 'modle'" in err
    names = book.find_chapter("model_organism", ROOT).parameters()
    assert "valid names: " + ", ".join(names) in err


def test_bad_parameter_value_lists_the_allowed_values(capsys):
    assert cli.main(["run", "2", "-p", "prompt_format=fancy"]) == 2
    assert "bad value 'fancy' for parameter 'prompt_format'; allowed: auto | paper | chat" in capsys.readouterr().err
    assert cli.main(["run", "2", "-p", "n_questions=0"]) == 2
    assert "allowed: null (all of a concept's questions) or an integer >= 1" in capsys.readouterr().err
    assert cli.main(["build", "--profile", "smoke", "-p", "methods=[grad_diff,sgd]"]) == 2
    assert "methods" in capsys.readouterr().err
    assert cli.main(["run", "2", "-p", "window"]) == 2
    assert "expected key=value" in capsys.readouterr().err


def test_the_schema_takes_its_vocabularies_from_the_registries(monkeypatch):
    restoring = [name for name, e in experiments.EXPERIMENTS.items() if e.restores_parameters]
    assert book.check_value("restorations", restoring, "t") == restoring
    with pytest.raises(book.BookError, match="bad value \\['coef'\\] for parameter 'restorations'; allowed: "
                       "a non-empty list of " + ", ".join(restoring)):
        book.check_value("restorations", ["coef"], "t")  # patches activations, restores no parameter
    # an experiment registered after the book was imported is a restoration too
    monkeypatch.setitem(experiments.EXPERIMENTS, "probe", SimpleNamespace(restores_parameters=True))
    assert book.check_value("restorations", ["probe"], "t") == ["probe"]
    assert book.PARAMETERS["restorations"].allowed.endswith(", probe")
    assert book.check_value("methods", list(unlearning.METHODS), "t") == list(unlearning.METHODS)
    assert book.check_value("second_methods", None, "t") is None
    with pytest.raises(book.BookError, match="allowed: a non-empty list of " + ", ".join(unlearning.METHODS)):
        book.check_value("methods", ["sgd"], "t")
    assert book.check_value("unlearning", {"lr": 1e-5}, "t") == {"lr": 1e-5}
    with pytest.raises(book.BookError, match="any of: lr, "):
        book.check_value("unlearning", {"learning_rate": 1e-5}, "t")


@pytest.mark.parametrize("name, good, bad", [
    ("device", [None, "cpu", "cuda", "cuda:1", "mps", "auto"], ["gpu", "cuda:", "CUDA", 0]),
    ("dtype", [None, *validate.DTYPES], ["fp16", "float64", 32]),
    ("seed", [0, 7], [-1, True, 1.0, "1"]),
    ("window", [1, 99], [0, 100, False]),
    ("relearn_lr", [1e-5, 0.5], [0, 1, float("nan"), float("inf"), True]),
])
def test_parameter_checks_share_the_package_validators(name, good, bad):
    for v in good:
        assert book.check_value(name, v, "t") == v
    for v in bad:
        with pytest.raises(book.BookError, match=f"bad value .* for parameter '{name}'"):
            book.check_value(name, v, "t")


@pytest.mark.parametrize("argv, message", [
    (["build", "--jobs", "0"], "argument --jobs: expected an integer >= 1, got '0'"),
    (["run", "2", "--jobs", "two"], "argument --jobs: expected an integer >= 1, got 'two'"),
    (["unlearn", "--concept", "Austria", "--lr", "nan"], "argument --lr: expected a finite number, got 'nan'"),
    (["sweep", "--unlearned", "x", "--out", "x.parquet", "--window", "-1"], "argument --window: expected an integer"),
])
def test_command_line_numbers_are_checked_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_concept_set_cuts_every_concept_and_stays_importable_from_the_book():
    assert book.concept_set is concepts.concept_set  # the chapters' old spelling, kept while they move
    full = concepts.concept_set("builtin")
    assert full.content_hash() == concepts.load("builtin").content_hash()
    cut = concepts.concept_set("builtin", 2, 1)
    assert cut.names == full.names and cut.content_hash() != full.content_hash()
    for a, b in zip(full, cut):
        assert b.questions == a.questions[:2] and b.unrelated_questions == a.unrelated_questions[:1]
        assert b.answers == (a.answers[:2] if a.answers else None)
        assert b.text_completion == a.text_completion[:2]
    assert "(first 2 questions, 1 unrelated)" in cut.source
    assert concepts.concept_set("builtin", 2, 1).content_hash() == cut.content_hash()  # a stable cache key


def test_the_project_is_found_from_anywhere_in_a_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv(book.BOOK_ENV, raising=False)
    assert book.project_root(ROOT / "notebooks") == ROOT
    assert book.project_root(tmp_path) == ROOT  # outside it: the checkout the package is installed from
    monkeypatch.setenv(book.BOOK_ENV, str(tmp_path))
    with pytest.raises(book.BookError, match="has no _toc.yml"):
        book.project_root()


def test_a_chapter_is_stale_when_any_module_of_the_package_changes(monkeypatch):
    # the package's code is part of every cache key, the executed chapters' included
    from dissect_unlearning import versions

    ch = book.find_chapter("model_organism", ROOT)
    params = book.resolve_parameters(ch, book.load_profile("smoke", ROOT))
    before = cache.key("chapter", book.execute.chapter_inputs(ch, params))
    monkeypatch.setattr(versions, "_PACKAGE_HASH", "0" * 16)
    assert cache.key("chapter", book.execute.chapter_inputs(ch, params)) != before


def test_bad_profile_is_refused_naming_file_and_parameter(tmp_path):
    root = make_project(tmp_path, [PARAMS])
    (root / "profiles" / "bad.yml").write_text("parameters: {seed: -1}\n")
    with pytest.raises(book.BookError, match=r"profile bad.yml.*bad value -1 for parameter 'seed'"):
        book.load_profile("bad", root)
    (root / "profiles" / "typo.yml").write_text("parameters: {sede: 1}\n")
    with pytest.raises(book.BookError, match="unknown parameter 'sede'; valid names: .*seed"):
        book.load_profile("typo", root)
    (root / "profiles" / "chap.yml").write_text("chapters: {probe: {window: 3}}\n")
    with pytest.raises(book.BookError, match="chapter 01_probe has no parameter 'window'; valid names: seed"):
        book.load_profile("chap", root)
    with pytest.raises(book.BookError, match="no profile 'nope'; profiles: bad, chap, p, typo"):
        book.load_profile("nope", root)


def test_undocumented_or_unreadable_parameters_are_refused(tmp_path):
    root = make_project(tmp_path, [("code", "seed = 0", "parameters")])
    with pytest.raises(book.BookError, match="parameter 'seed' has no comment"):
        book.build("p", root=root, output=tmp_path, verbose=False)
    root = make_project(tmp_path / "b", [("code", "seed = 0  # seed, e.g. seed = 1", "parameters")])
    with pytest.raises(book.BookError, match="papermill cannot read parameter"):
        book.chapters(root)[0].parameters()


# ------------------------------------------------------------------------------------------------------------------
# Failures are fatal and named (these execute small notebooks: a kernel, no model)
# ------------------------------------------------------------------------------------------------------------------
def test_a_raising_chapter_fails_the_build_naming_chapter_and_cell(tmp_path):
    cells = [("md", "# Probe"), PARAMS, ("code", "x = seed + 1"), ("code", "raise RuntimeError(f'boom {x}')")]
    root = make_project(tmp_path, cells)
    with pytest.raises(book.BookError) as err:
        book.build("p", root=root, output=tmp_path, verbose=False)
    msg = str(err.value)
    # cell 3 of the source notebook (0: markdown, 1: parameters, 2: x = ..., 3: raise); the profile's seed is used
    assert "chapter 01_probe failed in cell 3 of 01_probe.ipynb" in msg
    assert "RuntimeError: boom 4" in msg
    assert (tmp_path / "_build" / "failed" / "01_probe.ipynb").is_file()
    assert not (tmp_path / "_build" / "html").exists()


def test_a_broken_page_fails_the_html_build(tmp_path):
    cells = [("md", "# Probe\n\nThe value is {glue:text}`never_glued`."), PARAMS, ("code", "y = seed")]
    root = make_project(tmp_path, cells)
    with pytest.raises(book.BookError, match="(?s)jupyter-book build failed.*never_glued"):
        book.build("p", root=root, output=tmp_path, verbose=False)


def add_chapter(root: Path, cells, name: str) -> None:
    """A second chapter in a make_project() project, listed after the first in the toc."""
    nb = nbformat.v4.new_notebook()
    for kind, src, *tags in cells:
        cell = nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
        if tags:
            cell.metadata["tags"] = tags
        nb.cells.append(cell)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, root / "notebooks" / f"{name}.ipynb")
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    toc["chapters"].append({"file": f"notebooks/{name}"})
    (root / "_toc.yml").write_text(yaml.safe_dump(toc))


ENV_PROBE = ("code", "import os\nprint(os.environ['DISSECT_UNLEARNING_FIGURES'], os.environ.get('OMP_NUM_THREADS'))")


def test_chapters_side_by_side_keep_their_own_environment_and_order(tmp_path):
    import os

    root = make_project(tmp_path, [("md", "# A"), PARAMS, ENV_PROBE], name="01_a")
    add_chapter(root, [("md", "# B"), PARAMS, ENV_PROBE], name="02_b")
    report = book.build("p", root=root, output=tmp_path, verbose=False, html=False, jobs=2)
    assert [r.chapter.stem for r in report.runs] == ["01_a", "02_b"]
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    for r in report.runs:
        out = nbformat.read(r.notebook, as_version=4).cells[-1].outputs[0]["text"].split()
        assert out == [f"figures/{r.chapter.stem}", threads]
    # One at a time: torch keeps its own default (no thread limit is set)
    report = book.build("p", root=root, output=tmp_path, verbose=False, html=False, force=True, jobs=1)
    for r in report.runs:
        out = nbformat.read(r.notebook, as_version=4).cells[-1].outputs[0]["text"].split()
        assert out[0] == f"figures/{r.chapter.stem}" and out[1] == str(os.environ.get("OMP_NUM_THREADS"))
    with pytest.raises(book.BookError, match="jobs must be an integer >= 1"):
        book.build("p", root=root, output=tmp_path, verbose=False, jobs=0)


def test_a_failure_side_by_side_names_the_chapter(tmp_path):
    root = make_project(tmp_path, [("md", "# A"), PARAMS, ("code", "x = seed")], name="01_a")
    add_chapter(root, [("md", "# B"), PARAMS, ("code", "raise ValueError('bad b')")], name="02_b")
    with pytest.raises(book.BookError, match="chapter 02_b failed in cell 2 of 02_b.ipynb.*\n?.*ValueError: bad b"):
        book.build("p", root=root, output=tmp_path, verbose=False, jobs=2)
    assert not (tmp_path / "_build" / "html").exists()


# ------------------------------------------------------------------------------------------------------------------
# The smoke book, end to end
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_book(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke-book")
    # two at a time, as `make book` runs (JOBS=2): the precompute's second phase and the chapters side by side
    first = book.build("smoke", root=ROOT, output=out, verbose=False, jobs=2)
    # nothing changed: every chapter is reused; --only keeps the other pages of the last build
    second = book.build("smoke", root=ROOT, output=out, verbose=False)
    only = book.build("smoke", only=["2"], root=ROOT, output=out, verbose=False)
    return out, first, second, only


class _Refs(HTMLParser):
    """Every URL a page makes the browser fetch by itself (scripts, styles, images, frames)."""

    def __init__(self):
        super().__init__()
        self.urls = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("script", "img", "iframe", "source", "video", "audio") and a.get("src"):
            self.urls.append(a["src"])
        if tag == "link" and a.get("href") and a.get("rel") not in ("index", "search", "next", "prev"):
            self.urls.append(a["href"])


def _pages(html: Path):
    return [p for p in sorted(html.rglob("*.html")) if not {"_static", "_sources"} & set(p.parts)]


@pytest.mark.book
def test_smoke_profile_builds_the_whole_book(smoke_book):
    out, first, second, only = smoke_book
    html = out / "_build" / "html"
    toc_chapters = [ch.stem for ch in book.chapters(ROOT) if ch.in_toc]
    assert first.executed == toc_chapters and first.html == html
    assert (html / "index.html").is_file() and (html / "book" / "reference.html").is_file()
    for stem in toc_chapters:
        page = (html / "notebooks" / f"{stem}.html").read_text()
        assert "Parameters of this run: profile" in page and "Last executed" in page
        for v in book.VERSIONED:
            assert v in page
        # the parameters cell and papermill's injected cell are hidden: no assignment of a parameter shows
        assert not re.search(r"n_questions\s*=\s*3", re.sub(r"<[^>]+>", "", page))
        assert "Traceback" not in page
    # every chart's static image lies beside its page
    for page in _pages(html):
        for url in re.findall(r'href="(figures/[^"]+\.svg)"', page.read_text()):
            assert (page.parent / url).is_file(), url
    assert list((html / "notebooks" / "figures").rglob("*.svg"))
    # the precompute stage left the chapters nothing heavy to compute, and it failed nowhere
    assert first.precomputed and not [r["error"] for r in first.precomputed if r["error"]]
    heavy = [kind for kind, _ in first.built_by_chapters if kind in precompute.HEAVY_KINDS]
    assert heavy == [], f"the chapters built {heavy}: precompute.tasks() misses a stage they use"
    # nothing changed: nothing is executed again, nothing precomputed
    assert second.executed == [] and second.reused == toc_chapters and second.precomputed == []
    assert [r.chapter.stem for r in only.runs] == ["02_model_organism"] and only.executed == []
    for stem in toc_chapters:
        assert (html / "notebooks" / f"{stem}.html").is_file()


@pytest.mark.book
def test_pages_reference_only_local_files(smoke_book):
    html = smoke_book[0] / "_build" / "html"
    for page in _pages(html):
        refs = _Refs()
        refs.feed(page.read_text())
        for url in refs.urls:
            assert not re.match(r"^(https?:)?//", url), f"{page.name} loads {url}"
            local = url.split("?")[0].split("#")[0]
            assert (page.parent / local).exists(), f"{page.name}: {url} is missing"


def _chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("the page test needs Debian's chromium and chromium-driver: run `make browser` "
                    "(apt-get install chromium chromium-driver)")
    opts = Options()
    opts.binary_location = chromium
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic",
                "--disable-dev-shm-usage", f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


@pytest.mark.book
def test_every_page_loads_offline_without_errors_and_draws_its_charts(smoke_book):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    html = smoke_book[0] / "_build" / "html"
    driver = _chromium()
    charts_seen = 0
    try:
        driver.get("about:blank")
        driver.get_log("performance")  # drop the browser's own start-up traffic
        driver.get_log("browser")
        for page in _pages(html):
            driver.get(page.as_uri())
            charts = driver.find_elements(By.CSS_SELECTOR, ".dissect-chart-view")
            WebDriverWait(driver, 30).until(lambda d: all(
                d.execute_script("return arguments[0].querySelector('svg.marks, canvas') !== null", c)
                for c in charts), message=f"{page.name}: a chart was not drawn")
            charts_seen += len(charts)
            errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert not errors, f"{page.relative_to(html)}: console errors {errors}"
            requests = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
            urls = [m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"]
            remote = [u for u in urls if re.match(r"^(https?|wss?|ftp):", u)]
            assert not remote, f"{page.relative_to(html)} requested {remote}"
            assert any(u.startswith("file:") for u in urls)
    finally:
        driver.quit()
    assert charts_seen >= 1
