"""Faults a classroom meets: a demo-model conversion killed half-way recovers on the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from medgemma_lib.models import loading as models


@pytest.mark.slow
def test_conversion_killed_midway_recovers(tmp_path):
    env = {**os.environ, models.CACHE_ENV: str(tmp_path), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "medgemma_lib", "models", "--prepare-demo"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    tmp_glob = models.DEMO_TMP_GLOB
    # Wait until the conversion has started writing its temporary folder, then a bit more.
    while time.time() < deadline and not list(tmp_path.glob(tmp_glob)):
        time.sleep(0.5)
    assert list(tmp_path.glob(tmp_glob)), "conversion never started"
    time.sleep(8)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    target = tmp_path / models.DEMO_FOLDER_NAME
    assert not target.exists(), "a killed conversion must not leave a folder that looks like a model"
    assert list(tmp_path.glob(tmp_glob)), "the half-written work stays in a temporary folder"

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert list(tmp_path.glob(tmp_glob)) == [], "the next run cleans up the interrupted attempt"
    os.environ[models.CACHE_ENV] = str(tmp_path)
    try:
        assert models.demo_model_cached()
    finally:
        del os.environ[models.CACHE_ENV]
