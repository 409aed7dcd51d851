"""benchmarks/report.py: the Markdown tables of a GPU run come from its JSON, numbers as measured
(here the committed 2026-11-25 H100 results), and a section that failed is named, not dropped."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _report(results_dir: Path) -> str:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--results", str(results_dir)],
                         capture_output=True, text=True, check=True)
    return out.stdout


def test_report_renders_a_gpu_run(tmp_path):
    for name in ("decode", "suite", "transforms"):
        shutil.copy(RESULTS / f"2026-11-25_h100_{name}_flashinfer_ssm.json", tmp_path / f"{name}.json")
    text = _report(tmp_path)
    decode = json.loads((tmp_path / "decode.json").read_text())["rows"]
    best = max(decode, key=lambda r: r["decode_tok_s"] if r["batch"] == 1 else 0)
    row = (f"| bench-hybrid-0.6b | 1 | {best['compile']} | {best['attn']} | {best['ssm']} |  |  | "
           f"{best['decode_tok_s']:.3g} |")
    assert row in text
    assert f"{100 * best['fraction_of_floor']:.1f} %" in text
    for title in ("Decode throughput", "Performance transforms", "Step profile", "Prefill", "Op overhead",
                  "Sliding-window KV memory", "Speculative decoding"):
        assert f"### {title}" in text
    assert text.count("| bench-swa-0.7b |") >= 7  # every transforms row of both models is there
    assert "4.43x" in text  # known-continuation speculation
    assert "Sections that failed" not in text


def test_report_names_failed_sections_and_missing_files(tmp_path):
    assert "no result files" in _report(tmp_path)
    (tmp_path / "suite.json").write_text(json.dumps({"gpu": "x", "spec": {"error": "RuntimeError('boom')"}}))
    assert "Sections that failed: spec: RuntimeError('boom')" in _report(tmp_path)
