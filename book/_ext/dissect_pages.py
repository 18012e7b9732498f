"""Sphinx tweaks of the book's pages (loaded through _config.yml `sphinx: local_extensions`).

Jupyter Book 1.0.4 with Sphinx 7 adds the inline configuration scripts of sphinx-thebe and sphinx-togglebutton twice
to every page; the second `const THEBE_JS_URL` is a JavaScript error in the console. The book has no live-code
(thebe) buttons, so its scripts go, and any other script that appears twice is kept once.
"""


def _drop_duplicate_scripts(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, kept = set(), []
    for js in scripts:
        filename = getattr(js, "filename", js)
        body = (getattr(js, "attributes", None) or {}).get("body", "")
        if "THEBE_JS_URL" in body or "sphinx-thebe" in str(filename or ""):
            continue
        key = (str(filename), body)
        if key in seen:
            continue
        seen.add(key)
        kept.append(js)
    context["script_files"] = kept


def setup(app):
    app.connect("html-page-context", _drop_duplicate_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
