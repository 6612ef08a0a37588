"""What a person sees: a real (headless) browser opens Flower's task page
of a GPU job and the GPU worker's page. Screenshots go to the test's
tmp_path and to /tmp/ares-flower-shots/ for people to look at."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.observability.conftest import HOST, WORKER
from tests.processes import wait_for

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path("/tmp/ares-flower-shots")


@pytest.fixture()
def page(tmp_path):
    # scripts/bootstrap.sh installs both: missing means a broken setup, which
    # must fail the suite rather than quietly skip the browser check.
    assert CHROMIUM.exists(), (f"{CHROMIUM} is missing (Debian package "
                               "chromium; scripts/bootstrap.sh installs it)")
    from playwright import sync_api
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM),
                                             args=["--no-sandbox"])
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 1400})
        finally:
            browser.close()


def screenshot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    SHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SHOTS / name)


def test_task_and_worker_pages_show_placement_and_inventory(stack, page,
                                                             tmp_path):
    result = stack.jobs.gpu2_nvlink.apply_async(
        kwargs={"hold": 0}, request_id="flower-browser-1")
    value = result.get(timeout=30)
    stack.flower.wait_for_task_field(result.id, "ares_commit")

    page.goto(f"{stack.flower.url}/task/{result.id}")
    details = page.locator("section.task-details-card")
    for label, shown in (("Ares fencing token", str(value["token"])),
                         ("Ares host", HOST),
                         ("Ares gpus", str(value["gpus"])),
                         ("Ares placement score", str(value["score"])),
                         ("Ares commit", "accepted")):
        row = details.locator("div.detail-row", has=page.locator(
            "dt", has_text=label)).first
        assert row.is_visible(), label
        assert shown in row.locator("dd").inner_text(), (label, shown)
    screenshot(page, tmp_path, "task-gpu.png")

    # Another job holds four GPUs while we look at the worker's inventory.
    holder = stack.jobs.gpu4.apply_async(kwargs={"hold": 60},
                                         request_id="flower-browser-2")
    wait_for(lambda: stack.store.llen(f"test:gpu-started:{holder.id}"), 20,
             "the 4-GPU job to start")
    try:
        # Flower renders cached stats and refreshes them behind the page:
        # reload until the page shows the GPUs taken.
        text = wait_for(lambda: "4 busy" in (t := worker_summary(
            page, stack)) and t, 20, "the worker page to show 4 GPUs busy")
    finally:
        stack.jobs.release(stack.store, f"test:release:{holder.id}")
    assert f"host {HOST}: 8 GPUs" in text and "4 free" in text
    assert f"{holder.id[:8]}" in text      # which job holds them
    assert "links: NV1, NV2" in text
    screenshot(page, tmp_path, "worker-gpu-inventory.png")
    holder.get(timeout=20)


def worker_summary(page, stack) -> str:
    """The text of the ``ares_gpu_summary`` row on the worker's "Other" tab,
    once the tab has faded in (Playwright counts a transparent element as
    visible, a person would not)."""
    page.goto(f"{stack.flower.url}/worker/{WORKER}")
    page.click("#worker-tab-other")
    page.wait_for_function(
        "getComputedStyle(document.querySelector('#tab-other')).opacity"
        " === '1'", timeout=10_000)
    summary = page.locator("#tab-other tr", has_text="ares_gpu_summary")
    assert summary.is_visible()
    return summary.inner_text()
