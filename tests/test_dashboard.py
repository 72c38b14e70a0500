"""The tracker dashboard renders in headless Chromium, shows the peers and refreshes itself."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedtorrent.config import TrackerConfig
from fedtorrent.net.tracker.client import TrackerClient
from fedtorrent.net.tracker.server import BackgroundTracker

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.network,
    pytest.mark.timeout(90),
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)",
    ),
]
SWARM = "d" * 64
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def tracker() -> Iterator[BackgroundTracker]:
    with BackgroundTracker(TrackerConfig(port=0), rng=random.Random(1)) as running:
        yield running


def test_dashboard_lists_swarms_and_peers_and_refreshes(tracker: BackgroundTracker) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    client = TrackerClient(tracker.url, retries=0)
    for i in range(4):
        client.announce(
            SWARM, f"peer-{i}", port=7000 + i, round=i + 1, accuracy=0.25 * i, bytes_sent=2048 * i
        )
    client.announce(
        SWARM, "peer-3", port=7003, round=4, accuracy=0.75, bytes_sent=6144, event="completed"
    )

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(tracker.url + "/")
            page.wait_for_selector('tr[data-peer-id="peer-3"]', timeout=20_000)

            swarm_row = page.locator(f'#swarms tr[data-info-hash="{SWARM}"] td')
            assert swarm_row.nth(2).inner_text() == "4"  # peers
            assert swarm_row.nth(3).inner_text() == "1"  # completed
            assert swarm_row.nth(4).inner_text() == "4"  # max round
            peer = page.locator('tr[data-peer-id="peer-3"] td')
            assert peer.nth(1).inner_text() == "127.0.0.1:7003"
            assert peer.nth(2).inner_text() == "4"
            assert peer.nth(3).inner_text() == "75.0%"
            assert peer.nth(4).inner_text() == "6.0 KiB"
            assert peer.nth(6).inner_text() == "yes"
            assert page.locator("table.peers tbody tr").count() == 4
            assert "1 swarm(s), 4 live peer(s)" in page.locator("#status").inner_text()

            # A peer joining and one leaving show up without reloading the page.
            client.announce(SWARM, "latecomer", port=7100, round=9, accuracy=0.5)
            client.announce(SWARM, "peer-0", port=7000, event="stopped")
            page.wait_for_selector('tr[data-peer-id="latecomer"]', timeout=20_000)
            page.wait_for_selector('tr[data-peer-id="peer-0"]', state="detached", timeout=20_000)
            assert page.locator("table.peers tbody tr").count() == 4
            assert errors == []
        finally:
            browser.close()


def test_dashboard_plots_accuracy_and_bytes_per_round_for_every_peer(
    tracker: BackgroundTracker, tmp_path: Path
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    client = TrackerClient(tracker.url, retries=0)
    peers = ["peer-a", "peer-b", "peer-c"]
    for r in range(1, 6):
        for i, peer_id in enumerate(peers):
            client.announce(
                SWARM,
                peer_id,
                port=7000 + i,
                round=r,
                accuracy=min(1.0, 0.1 * r + 0.05 * i),
                bytes_sent=1000 * r * (i + 1),
                bytes_received=500 * r,
            )

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(tracker.url + "/")
            accuracy = page.locator('[data-plot="accuracy"] polyline')
            accuracy.first.wait_for(timeout=20_000)
            assert accuracy.count() == len(peers)  # one line per peer
            lines = {
                accuracy.nth(i).get_attribute("data-peer-id"): accuracy.nth(i)
                for i in range(len(peers))
            }
            assert set(lines) == set(peers)
            for peer_id, line in lines.items():
                assert line.get_attribute("data-rounds") == "1,2,3,4,5"
                points = (line.get_attribute("points") or "").split()
                heights = [float(p.split(",")[1]) for p in points]
                assert len(heights) == 5 and heights == sorted(heights, reverse=True)  # rising
                dots = page.locator(f'[data-plot="accuracy"] g[data-peer-id="{peer_id}"] circle')
                assert [dots.nth(k).get_attribute("data-round") for k in range(5)] == [
                    "1", "2", "3", "4", "5"
                ]  # fmt: skip
            traffic = page.locator('[data-plot="bytes"] polyline')
            assert traffic.count() == len(peers)
            for i in range(len(peers)):
                assert traffic.nth(i).get_attribute("data-rounds") == "2,3,4,5"  # per-round deltas
            assert page.locator('[data-plot="accuracy"] .legend li').count() == len(peers)

            # A new round shows up without reloading the page.
            client.announce(SWARM, "peer-a", port=7000, round=6, accuracy=0.9, bytes_sent=7000)
            page.wait_for_selector(
                '[data-plot="accuracy"] polyline[data-peer-id="peer-a"][data-rounds="1,2,3,4,5,6"]',
                timeout=20_000,
            )
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            assert errors == []
        finally:
            browser.close()
