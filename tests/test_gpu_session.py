"""scripts/gpu_session.sh's control flow, with `python3` and `nvidia-smi` replaced by stand-ins.

A GPU session has 15 minutes of device time and gets at most 8 files back from a call, so what
is checked here is what would waste it: every stage's files reach $OUT in one archive, the
micro-batch sweep tells an out-of-memory stop (the measurement) from any other failure (a bug),
and MFU's peak is left to cpt_lightning/peak_flops.py (a fixed 989 overrode an H200 NVL's 835.5).
"""

import os
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Stand-in python3: logs its arguments (and CPT_TEST_TOKENIZER when set); `cpt bench` writes its --out JSON, and fails at the micro-batch
# named by $FAIL_ROWS with the message in $FAIL_MESSAGE; pip fails with $PIP_ERROR; a command with $HANG_ON in it hangs,
# deaf to SIGTERM (as a Lightning step is: its handler only sets a flag read between batches).
FAKE_PYTHON = """#!/usr/bin/env bash
echo "${CPT_TEST_TOKENIZER:+CPT_TEST_TOKENIZER=$CPT_TEST_TOKENIZER }$*" >> "$CALLS"
[ "$2" = pip ] && { echo "pip: ${PIP_ERROR:-ok}"; [ -z "${PIP_ERROR:-}" ]; exit; }
if [ -n "${HANG_ON:-}" ] && [[ "$*" == *"$HANG_ON"* ]]; then echo "step 1 start"; echo $$ > "$HUNG_PID"; trap '' TERM; sleep 60; fi
if [ -n "${FAIL_ROWS:-}" ] && [[ "$*" == *"micro_batch_size=$FAIL_ROWS"* ]]; then echo "$FAIL_MESSAGE" >&2; exit 1; fi
while [ $# -gt 0 ]; do [ "$1" = --out ] && echo '{}' > "$2"; shift; done
exit 0
"""


@pytest.fixture
def session(tmp_path):
    """Run gpu_session.sh stages in a scratch copy of the scripts, on a fake 'NVIDIA H200'."""
    work = tmp_path / "repo"
    shutil.copytree(ROOT / "scripts", work / "scripts")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"python3": FAKE_PYTHON, "nvidia-smi": "#!/usr/bin/env bash\necho 'NVIDIA H200'\n"}.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    calls = tmp_path / "calls.txt"

    def run(*stages: str, killed_after_s: int | None = None, **env: str):
        """``killed_after_s``: the script is SIGKILLed then, as the device call's own limit would."""
        environment = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out), "CALLS": str(calls),
                       "KIT_SITE": str(tmp_path / "site"), **env}
        limit = ["timeout", "-s", "KILL", str(killed_after_s)] if killed_after_s else []
        done = subprocess.run([*limit, "bash", "scripts/gpu_session.sh", *stages], cwd=work, env=environment,
                              capture_output=True, text=True, timeout=60)
        archive = out / "gpu_session.tar.gz"
        with tarfile.open(archive) as tar:
            names = sorted(Path(name).name for name in tar.getnames() if name != ".")
        return done, names, (out / "summary.txt").read_text(), calls.read_text() if calls.exists() else ""

    return run


def test_every_stage_comes_back_in_one_archive_and_the_peak_is_the_chips_own(session, tmp_path):
    done, names, summary, calls = session("sdpa", "flex", "sweep")
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["gpu_session.tar.gz", "summary.txt"]  # within the 8-file limit
    assert {"sdpa.json", "sdpa.log", "flex.json", "flex.log", "sweep.log", "summary.txt", "nvidia-smi.txt",
            "flex_mb8.json", "flex_mb32.json"} <= set(names)
    assert "sdpa exit=0" in summary and "flex exit=0" in summary and "sweep exit=0" in summary
    benches = [line for line in calls.splitlines() if " bench " in line]
    assert benches and not any("--peak-tflops" in line for line in benches)  # peak_flops.py knows H200 and NVL


def test_sweep_stops_at_out_of_memory_and_reports_the_largest_micro_batch(session, tmp_path):
    done, names, summary, _ = session("sweep", FAIL_ROWS="24", FAIL_MESSAGE="torch.OutOfMemoryError: CUDA out of memory.")
    assert "sweep exit=0" in summary
    assert "flex_mb16.json" in names and "flex_mb32.json" not in names  # nothing tried past the limit
    log = (tmp_path / "repo/runs/gpu_session/sweep.log").read_text()
    assert "the largest micro-batch that ran: 16" in log


def test_sweep_fails_when_not_even_the_smallest_micro_batch_fits(session, tmp_path):
    _, _, summary, _ = session("sweep", FAIL_ROWS="8", FAIL_MESSAGE="torch.OutOfMemoryError: CUDA out of memory.")
    assert "sweep exit=1" in summary
    assert "the largest micro-batch that ran: 0" in (tmp_path / "repo/runs/gpu_session/sweep.log").read_text()


def test_an_archive_cut_short_leaves_the_last_whole_one(session, tmp_path):
    """Killed while packing (the call's limit, a full disk): the archive fetched must still open."""
    torn_tar = ('#!/usr/bin/env bash\nn=$(cat "$TAR_COUNT" 2>/dev/null || echo 0); echo $((n + 1)) > "$TAR_COUNT"\n'
                'if [ "$n" -ge 1 ]; then prev=; for a in "$@"; do [ "$prev" = -czf ] && { echo torn > "$a"; exit 1; }; '
                'prev=$a; done; fi\n'
                f'exec {shutil.which("tar")} "$@"\n')
    (tmp_path / "bin" / "tar").write_text(torn_tar)
    (tmp_path / "bin" / "tar").chmod(0o755)
    _, names, summary, _ = session("sdpa", TAR_COUNT=str(tmp_path / "tar_count"))  # packing after sdpa fails
    assert "sdpa exit=0" in summary and "nvidia-smi.txt" in names and "sdpa.json" not in names


def test_an_archive_of_a_log_that_grew_as_tar_read_it_still_lands(session, tmp_path):
    """GNU tar exits 1 when a file changes as it reads it (a running stage's log, packed every 20 s), the archive
    whole all the same: packing gave up on it, so the archive came back as of the stage before."""
    changed_tar = f'#!/usr/bin/env bash\n{shutil.which("tar")} "$@" || exit\n[[ " $* " == *" -czf "* ]] && exit 1\nexit 0\n'
    (tmp_path / "bin" / "tar").write_text(changed_tar)
    (tmp_path / "bin" / "tar").chmod(0o755)
    _, names, summary, _ = session("sdpa")
    assert "sdpa exit=0" in summary and "sdpa.json" in names


@pytest.mark.parametrize("rows", ["8", "16"])
def test_sweep_fails_when_a_micro_batch_fails_for_another_reason(session, tmp_path, rows):
    _, _, summary, _ = session("sweep", FAIL_ROWS=rows, FAIL_MESSAGE="RuntimeError: some kernel bug")
    assert "sweep exit=1" in summary
    assert f"micro-batch {rows} failed, not for memory" in (tmp_path / "repo/runs/gpu_session/sweep.log").read_text()


@pytest.mark.parametrize(("stages", "env", "said"), [
    (("sdpa", "flexx", "tests"), {}, "unknown stage flexx (the stages: tests masks"),
    (("sdpa",), {"DEADLINE_S": "570.5"}, "DEADLINE_S=570.5 is not whole seconds"),
    (("sdpa",), {"DEADLINE_S": "570s"}, "DEADLINE_S=570s is not whole seconds"),
])
def test_a_misspelt_stage_or_deadline_is_refused_before_any_stage_runs(session, stages, env, said):
    """The one device call ran the stages before a typo and lost every one after it; a DEADLINE_S of 570.5 failed
    every stage's arithmetic, ran nothing, and exited 0."""
    done, names, summary, calls = session(*stages, **env)
    assert done.returncode == 2 and said in done.stderr and said in summary
    assert calls == "" and "sdpa.json" not in names


def test_the_tests_stage_needs_no_network_for_its_tokenizer(session):
    """A device machine cannot download the sample's wheels: the tests read the bench kit's tokenizer."""
    done, names, summary, calls = session("tests")
    assert done.returncode == 0, done.stderr
    assert "CPT_TEST_TOKENIZER=.bench-kit/tokenizer -m pytest -q -rs tests/test_gpu.py tests/test_flash_varlen.py" in calls


def has_ended(pid: int, wait_s: float = 5.0) -> bool:
    """Gone, or a zombie (dead, waiting for whoever adopted it to reap it)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.1)
    return False


def test_a_hung_stage_is_killed_before_the_deadline_and_what_it_printed_comes_back(session, tmp_path):
    """DEADLINE_S keeps the script inside the device call's limit: the hung stage is cut (SIGKILL after the
    ignored SIGTERM), later stages are skipped, and the archive is packed before the call would be killed."""
    started = time.monotonic()
    done, names, summary, calls = session("sdpa", "flex", DEADLINE_S="26", HANG_ON="--out runs/gpu_session/sdpa.json",
                                          HUNG_PID=str(tmp_path / "hung.pid"))
    assert time.monotonic() - started < 26
    assert has_ended(int((tmp_path / "hung.pid").read_text()))  # not left holding the GPU after its stage
    cut = re.search(r"sdpa exit=124 seconds=(\d+) limit=(\d+)", summary)  # TERM, then the group's KILL
    assert cut and int(cut[1]) - int(cut[2]) <= 1 and int(cut[2]) <= 11 and "flex skipped" in summary
    assert "sdpa.log" in names and "flex.json" not in names
    assert "  sdpa| step 1 start" in done.stdout  # the log's tail reaches the device call's output


def test_a_stage_the_calls_own_limit_kills_has_its_log_in_the_archive_so_far(session, tmp_path):
    """Less device time left than DEADLINE_S allowed for: the call's limit kills the script mid-stage. The archive
    was packed only after a stage, so the hung stage's log, where it had got to, never came back."""
    hung = tmp_path / "hung.pid"
    done, names, summary, _ = session("masks", killed_after_s=5, PACK_EVERY_S="1", HANG_ON="attention_masks.py",
                                      HUNG_PID=str(hung))
    try:
        assert done.returncode == -9 or done.returncode == 137
        assert "masks.log" in names and "masks exit" not in summary
        with tarfile.open(tmp_path / "out" / "gpu_session.tar.gz") as tar:
            assert tar.extractfile("./masks.log").read().decode() == "step 1 start\n"
    finally:
        os.killpg(os.getpgid(int(hung.read_text())), 9)  # the device ends what the script left; here the test does


def test_an_install_cut_short_is_done_again_and_a_whole_one_is_not(session, tmp_path):
    """A site holding litdata was taken as installed: a pip killed mid-copy left the later calls without the rest."""
    (tmp_path / "site" / "litdata").mkdir(parents=True)  # what a cut pip --target leaves
    session("sdpa")
    _, _, _, calls = session("sdpa")
    assert calls.count("-m pip install") == 1


def test_a_failed_install_stops_at_once_with_its_error_and_the_machine_description(session):
    done, names, summary, calls = session("sdpa", PIP_ERROR="no matching distribution for litdata")
    assert done.returncode == 1 and "env exit=1" in summary
    assert {"nvidia-smi.txt", "env.log"} <= set(names) and "no matching distribution" in done.stdout
    assert " bench " not in calls
