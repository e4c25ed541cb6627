"""The documentation says what the records and the code say."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_performance_tables_are_the_records_rendered():
    spec = importlib.util.spec_from_file_location("render", ROOT / "bench" / "render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    text = render.DOC.read_text()
    assert render.rendered_doc(text) == text, "docs/performance.md is out of date: run python bench/render.py"
    # every record names what produced it
    import json

    for file in [*render.RECORDS.values(), *render.SHAPE_RECORDS.values(), *render.HOST_RECORDS.values()]:
        if file not in render.RECORDS.values() and not (render.RESULTS / file).exists():
            continue  # the optional records are rendered only when they were made
        info = json.loads((render.RESULTS / file).read_text())["info"]
        for key in ("gpu" if "machine" not in info else "machine", "torch", "peft", "reslora", "date", "commit"):
            assert info.get(key), f"{file} has no {key}"


def test_the_docs_link_only_to_files_that_exist():
    for doc in [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"
