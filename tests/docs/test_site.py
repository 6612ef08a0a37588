"""The documentation site builds cleanly and says what the code does.

``mkdocs build --strict`` turns every warning into a failure: a broken link
or anchor, a page missing from the navigation, an API reference entry that
no longer resolves, a docstring griffe cannot read. The other tests hold
the pages to the code: every ``ares_*`` setting is in the configuration
reference, and the GPU figures and placement tables are regenerated from
the placement code and compared with the committed ones.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ares_celery import settings

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "NO_MKDOCS_2_WARNING": "1", "HOME": str(out)})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{log[-6000:]}"
    assert "WARNING" not in log, log[-6000:]
    return out


def page(site: Path, name: str) -> str:
    return (site / name / "index.html").read_text()


def test_api_reference_is_generated_from_the_code(site):
    html = page(site, "api")
    for anchor in ("ares_celery.Ares", "ares_celery.Ares.gpu_task",
                   "ares_celery.exactly_once.task.ExactlyOnceTask",
                   "ares_celery.gpu.task.GpuTask", "ares_celery.gpu.request.GpuRequest",
                   "ares_celery.errors.AresError", "ares_celery.errors.LeaseLost",
                   "ares_celery.gpu.routing.GpuRouter.decide",
                   "ares_celery.gpu.request.best_placement",
                   "ares_celery.testing.servers.RedisServer",
                   "ares_celery.testing.servers.EtcdServer"):
        assert f'id="{anchor}"' in html, anchor
    # a docstring's text, not just a heading: mkdocstrings really read it
    assert "One root class lets callers write a single" in html \
        or "Root of all ares-celery errors" in html


def test_concepts_page_has_the_sequence_diagram_and_the_promises(site):
    html = page(site, "exactly-once")
    diagram = re.search(r'<pre class="mermaid"><code>(.*?)</code></pre>', html, re.S)
    assert diagram, "the mermaid fence was not rendered as a diagram block"
    text = diagram.group(1)
    for step in ("sequenceDiagram", "reserve request id", "publish message",
                 "create /ns/locks/job", "fencing token", "fenced commit"):
        assert step in text, step
    # mermaid reads ";" as the end of a statement: the diagram would not render
    assert ";" not in text.replace("&gt;", ">").replace("&lt;", "<").replace("&amp;", "&")
    assert 'id="what-exactly-once-does-and-does-not-promise"' in html
    assert "at-least-once" in html


def test_site_needs_no_network(site):
    """No fonts, scripts or styles from elsewhere: it reads offline."""
    external = set()
    for html in site.rglob("*.html"):
        text = html.read_text()
        external |= set(re.findall(r'<(?:script|link|img)[^>]*(?:src|href)="(https?://[^"]+)"',
                                   text))
    assert not external, sorted(external)
    assert (site / "javascripts/vendor/mermaid-11.17.2.min.js").stat().st_size > 1_000_000
    assert "fonts.googleapis.com" not in page(site, "api")


def documented_settings() -> set[str]:
    text = (DOCS / "configuration.md").read_text()
    return set(re.findall(r"^\|\s*`(ares_[a-z0-9_]+)`", text, re.M))


def code_settings() -> set[str]:
    """Every ``ares_*`` key in ``DEFAULTS`` and any other ``"ares_..."``
    literal in settings.py (a setting read without a default)."""
    source = Path(settings.__file__).read_text()
    return set(settings.DEFAULTS) | set(re.findall(r"[\"'](ares_[a-z0-9_]+)[\"']", source))


def test_every_setting_is_in_the_configuration_reference():
    missing = code_settings() - documented_settings()
    assert not missing, (f"settings in ares_celery/settings.py but not in the table of "
                         f"docs/configuration.md: {sorted(missing)}")


def test_the_configuration_reference_lists_no_setting_that_does_not_exist():
    stale = documented_settings() - code_settings()
    assert not stale, f"docs/configuration.md documents unknown settings: {sorted(stale)}"


def test_topology_figures_and_placement_tables_are_current():
    spec = importlib.util.spec_from_file_location(
        "topology_figures", DOCS / "scripts" / "topology_figures.py")
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    rendered = figures.render_all()
    assert len(rendered) == 2 * len(figures.NAMES)
    stale = figures.stale_files()
    assert not stale, (f"regenerate with `.venv/bin/python docs/scripts/topology_figures.py`: "
                       f"{[str(p.relative_to(ROOT)) for p in stale]}")
    dgx1 = rendered[DOCS / "generated" / "placement-dgx1-v100.md"]
    # the worked example in gpu-topology.md: 4 GPUs -> 0,1,2,3 at 25 GB/s;
    # with GPU 3 busy -> 4,5,6,7; all 8 -> 50 GB/s on NV2 edges only
    assert "| all | 4 | [0, 1, 2, 3] | 0-3-2-1-0 | 25 |" in dgx1
    assert "| all but [3] | 4 | [4, 5, 6, 7] |" in dgx1
    assert "| all | 8 | [0, 1, 2, 3, 4, 5, 6, 7] | 0-3-2-1-5-6-7-4-0 | 50 |" in dgx1
    svg = rendered[DOCS / "img" / "topology-dgx1-v100.svg"]
    assert svg.startswith("<svg") and "NV2: 50 GB/s" in svg and "GPU7" in svg


def _table_paths(text: str) -> list[str]:
    """Every `path` in the first column of the markdown table rows."""
    cells = re.findall(r"^\| (`[^|]+`) \|", text, re.M)
    return [path for cell in cells for path in re.findall(r"`([^`]+)`", cell)]


def test_architecture_package_map_lists_every_module():
    """The map in docs/architecture.md names every module of the package
    (package ``__init__`` files may be left out) and nothing that is gone."""
    text = (DOCS / "architecture.md").read_text()
    listed = set(_table_paths(text.split("## Package map", 1)[1]))
    package = ROOT / "ares_celery"
    modules = {str(p.relative_to(package)) for p in package.rglob("*.py")}
    required = {m for m in modules
                if not (m.endswith("__init__.py") and m != "__init__.py")}
    assert not required - listed, f"missing from the map: {sorted(required - listed)}"
    assert not listed - modules, f"no such module: {sorted(listed - modules)}"


def test_readme_layout_names_paths_that_exist():
    text = (ROOT / "README.md").read_text().split("## Layout", 1)[1]
    paths = _table_paths(text)
    assert {"ares_celery/coordination/", "ares_celery/headers.py"} <= set(paths)
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, missing
