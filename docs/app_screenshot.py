"""The screenshot docs/app.png: app.py serving a run, one counterfactual of the first non-smiling toyfaces test face,
in headless Chromium (pip install -r requirements-app.txt; apt-get install chromium chromium-driver). It prints the
time from the button press to the result.

    python docs/app_screenshot.py runs/toyfaces docs/app.png
"""
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from dataset import load_split  # noqa: E402

WIDTH, HEIGHT = 1280, 1000


def first_face_without_smile(folder: str) -> str:
    split = load_split("toyfaces", "test", 32, subset_fraction=0.01, seed=0, verbose=False)
    i = int(np.flatnonzero(split.attrs[:, 0].numpy() == 0)[0])          # column 0 is Smiling
    path = os.path.join(folder, "face.png")
    Image.fromarray(split.images[i].permute(1, 2, 0).numpy()).save(path)
    return path


def wait_for_server(url: str, server: subprocess.Popen, limit_s: float = 150) -> None:
    start = time.time()
    while True:
        if server.poll() is not None:
            sys.exit(f"app.py exited with status {server.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            if time.time() - start > limit_s:
                sys.exit(f"app.py did not answer within {limit_s:.0f} s")
            time.sleep(0.5)


def browser(folder: str) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={folder}", f"--window-size={WIDTH},{HEIGHT}", "--force-device-scale-factor=1",
                 "--hide-scrollbars"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService("/usr/bin/chromedriver"), options=options)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False})
    return driver


def main(run_dir: str, out_png: str) -> None:
    folder = tempfile.mkdtemp()
    face = first_face_without_smile(folder)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), "--run_dir", run_dir, "--device", "cpu",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for_server(url, server)
        driver = browser(os.path.join(folder, "chromium"))
        try:
            driver.get(url)
            wait = WebDriverWait(driver, 600)
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "input[type=file]"))
            driver.find_elements(By.CSS_SELECTOR, "input[type=file]")[0].send_keys(face)
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "button[aria-label='Remove Image']"))
            pressed = time.time()
            driver.find_element(By.ID, "edit").click()
            wait.until(lambda d: "flipped to" in d.find_element(By.TAG_NAME, "body").text)
            print(f"result {time.time() - pressed:.1f} s after the press")
            time.sleep(1)                                           # let the images finish drawing
            driver.execute_script("window.scrollTo(0, 0)")
            driver.save_screenshot(os.path.join(folder, "page.png"))
        finally:
            driver.quit()
    finally:
        server.terminate()
        server.wait(timeout=30)
    Image.open(os.path.join(folder, "page.png")).convert("RGB").save(out_png, optimize=True)
    print(f"wrote {out_png}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
