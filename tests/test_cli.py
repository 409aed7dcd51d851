"""The main job runs end to end and checks itself against transformers."""

import subprocess
import sys


def test_main_job_runs_and_passes():
    proc = subprocess.run([sys.executable, "-m", "autodeploy"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "equal to transformers" in proc.stdout and proc.stdout.strip().endswith("OK")


def test_bad_option_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "autodeploy", "run", "--model", "nope"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
