"""Launch and download buttons: one setting (repository.url in _config.yml); unset, the book has no launch buttons."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from dissect_unlearning.book import staging
from dissect_unlearning.book.project import BookError

ROOT = Path(__file__).resolve().parents[1]
REPO = "https://github.com/example-owner/dissect-unlearning"


def config_with(tmp_path: Path, url: str) -> Path:
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config["repository"]["url"] = url
    path = tmp_path / "_config.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_shipped_config_has_the_setting_unset_and_stages_without_launch_buttons():
    shipped = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert shipped["repository"]["url"] == ""  # documented beside it; a fork sets its own
    staged = yaml.safe_load(staging.staged_config(ROOT / "_config.yml"))
    assert "repository" not in staged and staged["html"]["use_repository_button"] is False
    assert not set(staging.LAUNCH_URLS) & set(staged["launch_buttons"])
    assert staged["html"]["use_download_button"] is True


def test_a_repository_url_turns_on_launch_and_repository_buttons(tmp_path):
    staged = yaml.safe_load(staging.staged_config(config_with(tmp_path, REPO + "/")))
    assert staged["repository"]["url"] == REPO and staged["repository"]["path_to_book"] == ""
    assert staged["html"]["use_repository_button"] is True
    assert staged["launch_buttons"]["binderhub_url"] and staged["launch_buttons"]["colab_url"]
    with pytest.raises(BookError, match="repository.url must be"):
        staging.staged_config(config_with(tmp_path, "not a url"))


@pytest.mark.book
@pytest.mark.parametrize("url", [REPO, ""])
def test_a_rendered_page_links_its_notebook_only_when_the_repository_is_set(tmp_path, url):
    """A one-page book rendered by Jupyter Book with the staged config: the launch links open the chapter's
    notebook at its path in the repository; without the setting the page renders without them."""
    src = tmp_path / "src"
    (src / "notebooks").mkdir(parents=True)
    (src / "_extra").mkdir()
    (src / "_config.yml").write_text(staging.staged_config(config_with(tmp_path, url)).replace(
        "local_extensions:", "local_extensions_unused:"))
    (src / "_toc.yml").write_text(yaml.safe_dump({"format": "jb-book", "root": "notebooks/01_page"}))
    nb = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": ["# A chapter\n", "Text."]},
                    {"cell_type": "code", "metadata": {"tags": ["parameters"]}, "execution_count": 1,
                     "outputs": [], "source": ["window = 5"]}],
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    (src / "notebooks" / "01_page.ipynb").write_text(json.dumps(nb))
    html = staging.render_html(src, tmp_path / "out", verbose=False) / "notebooks" / "01_page.html"
    page = html.read_text()
    if url:
        assert "mybinder.org" in page and "notebooks/01_page.ipynb" in page and "colab.research.google.com" in page
        assert REPO in page  # the repository button
    else:
        assert "mybinder.org" not in page and "colab.research.google.com" not in page
    assert "_sources/notebooks/01_page.ipynb" in page or "download" in page.lower()
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
