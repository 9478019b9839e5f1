"""Screenshot of ``scaletrain dashboard`` (the README's docs/dashboard.png).

    python scripts/dashboard_screenshot.py docs/dashboard.png RUN_DIR [RUN_DIR ...]

Starts the dashboard on a free 127.0.0.1 port, opens it in Debian's headless
Chromium through Playwright (pip install playwright; apt-get install
chromium), waits until every run's curves are drawn and the checkpoint
checks are done, and saves the whole page."""

import re
import select
import subprocess
import sys

from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def main(out: str, run_dirs: list[str]) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "scaletrain", "dashboard", *run_dirs, "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        if not select.select([proc.stdout], [], [], 30)[0]:
            sys.exit("the dashboard did not start within 30 s")
        url = re.search(r"http://\S+", proc.stdout.readline()).group(0)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url)
            page.wait_for_function("window.dashboard && window.dashboard.ticks >= 1 && "
                                   "!document.querySelector('#checkpoints').innerText.includes('checking')",
                                   timeout=60_000)
            page.screenshot(path=out, full_page=True)
            browser.close()
        print(f"wrote {out}")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
