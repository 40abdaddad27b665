"""bench/gpu_check.py keeps running: its CPU form at the tiny size, on the bundled real digits
(the CUDA-only checks report SKIP here; torchrun, the fp16 store, --amp and the epoch bench are
skipped to keep the suite short: tests/test_distributed.py covers torchrun and --amp,
tests/test_tiny.py a float16 store and tests/test_shipped.py the evaluate.py certification, on CPU)."""
import subprocess
import sys

import pytest

from helpers import ROOT

pytestmark = pytest.mark.slow


def test_gpu_check_runs_on_cpu_and_reports_every_check(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / 'bench' / 'gpu_check.py'), '--device', 'cpu', '--tiny',
                           '--skip', 'torchrun', 'epoch', 'amp', 'store in host memory, fp16', 'certify',
                           '--out', str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = [line for line in done.stdout.splitlines() if line.startswith('| ')]
    status = {cells[0]: cells[1] for cells in ([c.strip() for c in line.strip('|').split('|')] for line in table)}
    assert status['device loader'] == 'PASS'
    assert status['store on device, fp32'] == 'SKIP' and status['store on device, fp16'] == 'SKIP'
    assert status['store in host memory, fp32 (pinned on CUDA)'] == 'PASS'
    assert status['store in host memory, fp16'] == 'SKIP'
    assert status['certify'] == 'SKIP' and status['step'] == 'PASS'
    assert status['torchrun'] == 'SKIP' and status['epoch'] == 'SKIP'
    assert 'certified error' in done.stdout and "authors' layout" in done.stdout
