"""Build the book: execute the chapter notebooks with papermill, then render them with Jupyter Book 1.

`build()` checks the profile and every parameter, precomputes what the chapters will ask the cache for, executes
each chapter of `_toc.yml` into the package cache (an unchanged chapter is not executed again), stages a Jupyter
Book source folder in `_build/book/` and runs `jupyter-book build` on it with execution off and warnings as errors;
the HTML lands in `_build/html/`.

Modules, bottom up: `project` (where the book is, BookError), `params` (the parameter schema), `chapter` (the
notebooks and their parameters cells), `profiles` (profiles and the values a chapter runs with), `pages` (glue for
the chapters, the tables and the reference page), `execute` (one chapter through papermill, cached), `staging` (the
Jupyter Book source folder and its rendering), `builder` (the whole book).
"""
from ..concepts import concept_set  # the chapters' old spelling of concepts.concept_set
from .builder import BuildReport, ChapterPlan, build, plan_chapter
from .chapter import Chapter, Parameter, check_documented, chapters, find_chapter, toc_files
from .execute import KERNEL_NAME, VERSIONED, ChapterRun, execute_chapter, versions
from .pages import (describe_parameters, glue, glue_verdict, parameters_reference, parameters_table,
                    profiles_table, provenance_table, reference_page)
from .params import (PARAMETERS, PATH_PARAMETERS, PROMPT_FORMATS, UNLEARNING_SETTINGS, ParamSpec, check_value,
                     parse_assignment)
from .profiles import Profile, check_overrides, load_profile, profile_names, resolve_parameters
from .project import BOOK_ENV, BookError, project_root
from .staging import render_html, stage

__all__ = [
    "BOOK_ENV", "KERNEL_NAME", "PARAMETERS", "PATH_PARAMETERS", "PROMPT_FORMATS", "UNLEARNING_SETTINGS",
    "VERSIONED", "BookError", "BuildReport", "Chapter", "ChapterPlan", "plan_chapter", "ChapterRun", "ParamSpec", "Parameter", "Profile", "build",
    "chapters", "check_documented", "check_overrides", "check_value", "concept_set", "describe_parameters",
    "execute_chapter", "find_chapter", "glue", "glue_verdict", "load_profile",
    "parameters_reference", "parameters_table", "parse_assignment", "profile_names", "profiles_table",
    "project_root", "provenance_table", "reference_page", "render_html", "resolve_parameters", "stage",
    "toc_files", "versions",
]
