"""Run the C codec's own checks: the ASan/UBSan harness and the libFuzzer target.

The harness (tests/c/test_spop.c) is built with gcc and the sanitizers, the
fuzz target (fuzz/fuzz_decode.c) with clang's libFuzzer. A missing compiler is
a failure, not a skip (``make test`` installs clang); set SPOA_MP_SKIP_FUZZ=1
to skip the fuzz run only. SPOA_MP_FUZZ_SECONDS sets its length (default 60).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
HARNESS = ROOT / "tests" / "c" / "test_spop.c"
FUZZ_TARGET = ROOT / "fuzz" / "fuzz_decode.c"
CORPUS = ROOT / "fuzz" / "corpus"

# Every check in test_spop.c runs whatever earlier ones gave, so the count is
# fixed; a smaller number means part of the harness silently did not run.
# Update it when checks are added.
EXPECTED_CHECKS = 1557

SANITIZE_FLAGS = [
    "-std=c11",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-g",
    "-O1",
    "-fno-omit-frame-pointer",
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
]
# every sanitizer report is fatal: a report that lets the run go on would pass
FUZZ_FLAGS = ["-g", "-O1", "-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=all"]
# what ASan, UBSan and libFuzzer print when they find something
SANITIZER_REPORT = re.compile(
    r"runtime error:|ERROR: AddressSanitizer|ERROR: LeakSanitizer|ERROR: libFuzzer"
    r"|SUMMARY: \w+Sanitizer"
)
BUILD_TIMEOUT = 180


INSTALL_HINT = {
    "gcc": "apt-get install -y gcc",
    "clang": "apt-get install -y clang libclang-rt-14-dev",
}


def _compiler(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} not found: the C codec tests need it "
            f"(`make test` installs it; or {INSTALL_HINT[name]})",
            pytrace=False,
        )
    return path


def _build(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False)
    assert proc.returncode == 0, f"build failed: {' '.join(cmd)}\n{proc.stdout}{proc.stderr}"


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _fuzz_seconds() -> int:
    raw = os.environ.get("SPOA_MP_FUZZ_SECONDS", "60")
    try:
        seconds = int(raw)
    except ValueError:
        pytest.fail(f"SPOA_MP_FUZZ_SECONDS must be an integer, not {raw!r}", pytrace=False)
    assert seconds > 0, "SPOA_MP_FUZZ_SECONDS must be positive"
    return seconds


@pytest.mark.parametrize("compiler", ["gcc", "clang"])
def test_c_harness_under_sanitizers(tmp_path: Path, compiler: str) -> None:
    """Both compilers: their UBSan checks differ (clang's sees NULL + 0)."""
    cc = _compiler(compiler)
    exe = tmp_path / "test_spop"
    _build([cc, *SANITIZE_FLAGS, f"-I{CSRC}", str(CSRC / "spop.c"), str(HARNESS), "-o", str(exe)])

    proc = subprocess.run(
        [str(exe)], capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"C harness failed (exit {proc.returncode}):\n{_tail(output)}"
    report = SANITIZER_REPORT.search(output)
    assert report is None, f"sanitizer report in the harness output:\n{_tail(output)}"

    summary = re.search(r"^(\d+) passed, (\d+) failed$", proc.stdout, re.MULTILINE)
    plan = re.search(r"^1\.\.(\d+)$", proc.stdout, re.MULTILINE)
    assert summary, f"no summary in the harness output:\n{_tail(output)}"
    assert plan, f"no plan line in the harness output:\n{_tail(output)}"
    passed, failed = int(summary[1]), int(summary[2])
    assert failed == 0, _tail(output)
    assert int(plan[1]) == passed == EXPECTED_CHECKS, (
        f"expected {EXPECTED_CHECKS} checks, the harness ran {plan[1]} ({passed} passed)"
    )


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SPOA_MP_SKIP_FUZZ") == "1", reason="SPOA_MP_SKIP_FUZZ=1")
def test_fuzz_decoder(tmp_path: Path) -> None:
    clang = _compiler("clang")
    seconds = _fuzz_seconds()
    exe = tmp_path / "fuzz_decode"
    sources = [str(CSRC / "spop.c"), str(FUZZ_TARGET)]
    _build([clang, *FUZZ_FLAGS, f"-I{CSRC}", *sources, "-o", str(exe)])

    # libFuzzer adds inputs to its corpus directory: work on a copy
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS, corpus)
    assert any(corpus.iterdir()), f"empty seed corpus: {CORPUS}"
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()

    cmd = [
        str(exe),
        f"-max_total_time={seconds}",
        "-timeout=10",  # one input taking this long is a hang
        "-print_final_stats=1",
        f"-artifact_prefix={artifacts}/",
        str(corpus),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=seconds + 120, check=False, cwd=tmp_path
    )
    log = _tail(proc.stderr)
    crashes = sorted(p.name for p in (*artifacts.iterdir(), *tmp_path.glob("crash-*")))
    assert not crashes, f"fuzzer found crashes {crashes} (inputs in {artifacts}):\n{log}"
    assert proc.returncode == 0, f"fuzzer failed (exit {proc.returncode}):\n{log}"
    report = SANITIZER_REPORT.search(proc.stderr)
    assert report is None, f"sanitizer report in the fuzzer's output:\n{log}"
    done = re.search(r"^Done (\d+) runs in (\d+) second", proc.stderr, re.MULTILINE)
    assert done, f"the fuzzer did not report its runs:\n{log}"
    assert int(done[1]) > 0, f"the fuzzer ran no input:\n{log}"


UB_PROGRAM = r"""
#include <limits.h>
#include <stddef.h>
int main(int argc, char **argv)
{
    (void)argv;
    const char *p = NULL;
    p += argc - 1; /* NULL + 0: undefined, the bug the codec had (clang checks it) */
    int x = INT_MAX;
    x += argc; /* signed overflow (gcc checks it) */
    return p != NULL || x == 0;
}
"""


@pytest.mark.parametrize("compiler", ["gcc", "clang"])
def test_a_sanitizer_report_fails_the_build_flags_and_the_report_check(
    tmp_path: Path, compiler: str
) -> None:
    """The harness and fuzz flags make UBSan fatal (exit != 0), and the
    report check sees what it prints: a finding cannot pass as a clean run."""
    cc = _compiler(compiler)
    src = tmp_path / "ub.c"
    src.write_text(UB_PROGRAM)
    exe = tmp_path / "ub"
    flags = [f for f in (SANITIZE_FLAGS if compiler == "gcc" else FUZZ_FLAGS) if "fuzzer" not in f]
    if compiler == "clang":
        flags = [*flags, "-fsanitize=address,undefined"]
    _build([cc, *flags, str(src), "-o", str(exe)])
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0, proc.stderr
    assert SANITIZER_REPORT.search(proc.stderr), proc.stderr
