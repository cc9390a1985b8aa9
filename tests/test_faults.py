"""Fault injection: a compression run survives kills, full disks, concurrent starts, changed inputs and tampering.

The run under test is a tiny sharded Llama (2 blocks, hidden 64) compressed with SparseGPT, LM head included, so
every kind of step occurs: the lock, the manifest, block shards, saved calibration streams, the head shard, the rest
shard, config and tokenizer copies, the index, the report, removals. The kill and full-disk tests run a second time
on a two-stream run (AA-SVD with block refinement: both streams saved, anchored Gram matrices, low-rank shards).
``toolkit.files.FAULTS.hook`` is called before every durable step (a temporary file about to be filled, renamed over
its target, a file about to be removed):

* **kill at every step**: the recording hook copies the output directory at each step — exactly what a SIGKILL at
  that instant leaves on disk (every write is fsynced; temporary files included) — and each copy is then resumed.
  A few kills are also made for real (``ARMOR_FAULT_INJECTION=kill:N``, ``os._exit`` in a subprocess) and their
  leftovers compared with the copies.
* **disk full at every write**: the hook raises ``ENOSPC`` at the N-th write; the command must fail with one line and
  exit code 1, and ``--resume`` must then finish.

After each, every output file's sha256 must equal the uninterrupted run's (the report's timings aside), and until the
run's last write nothing may pass :func:`toolkit.manifest.verify_run`, the check every later step makes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from click.testing import CliRunner  # noqa: E402
from conftest import make_small_model  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402
from test_models import make_tiny_model, sample_text  # noqa: E402

from toolkit.cli import cli  # noqa: E402
from toolkit.compress import CompressSettings, compress_model  # noqa: E402
from toolkit.errors import EXIT_FAILURE, EXIT_INPUT, ArmorError  # noqa: E402
from toolkit.files import FAULTS  # noqa: E402
from toolkit.lock import LOCK_FILE, acquire_lock  # noqa: E402
from toolkit.manifest import MANIFEST_FILE, verify_run  # noqa: E402
from toolkit.models import load_model  # noqa: E402

SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SETTINGS = {"method": "sparsegpt", "nsamples": 4, "seqlen": 16, "block_size": 16, "lm_head": True}
BASE_OPTIONS = ["--method", "sparsegpt", "--nsamples", "4", "--seqlen", "16", "--block-size", "16"]
CLI_OPTIONS = [*BASE_OPTIONS, "--lm-head"]
TWO_STREAM_SETTINGS = {**SETTINGS, "method": "aa-svd", "ratio": 0.5, "refine_epochs": 2}
TWO_STREAM_OPTIONS = [*CLI_OPTIONS, "--method", "aa-svd", "--ratio", "0.5", "--refine-epochs", "2"]
UNCOMPARABLE = ("armor_report.json",)  # holds timings and the machine's load


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (relative path) with the sha256 of its bytes."""
    return {str(p.relative_to(directory)): sha256(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def comparable(directory: Path) -> dict[str, str]:
    """:func:`tree`, with the report left out and the manifest compared without the report's hash."""
    files = {name: digest for name, digest in tree(directory).items() if name not in UNCOMPARABLE}
    if MANIFEST_FILE in files:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        for name in UNCOMPARABLE:
            manifest["outputs"].pop(name, None)
        files[MANIFEST_FILE] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return files


def assert_same_layer_results(report: dict, expected: dict) -> None:
    """Same layers, same metrics (to rounding: a process with other BLAS threads sums in another order)."""
    assert [layer["name"] for layer in report["layers"]] == [layer["name"] for layer in expected["layers"]]
    for got, want in zip(report["layers"], expected["layers"], strict=True):
        assert got.keys() == want.keys()
        for key in got.keys() - {"seconds"}:
            assert got[key] == (pytest.approx(want[key], rel=1e-9) if isinstance(want[key], float) else want[key])


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, code: int, fragment: str) -> str:
    """The command failed with ``code``, one line ``error: …; …`` on stderr naming ``fragment``, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), result.exception  # handled, not a crash
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "; " in lines[0], lines[0]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output and result.stdout == ""
    return lines[0]


def assert_untrusted(directory: Path) -> None:
    """Nothing that reads models would accept ``directory``: the check every reader of compressed models makes
    refuses it, or it holds no weights and no config at all (absent, empty, or only a lock file)."""
    try:
        verify_run(directory)
    except ArmorError:
        return
    assert not directory.exists() or not [p for p in tree(directory) if p.endswith((".safetensors", "config.json"))]


def dead_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def as_if_killed(directory: Path) -> None:
    """A copy of a live run's directory records the live test process as the lock's owner; after a real kill the
    recorded pid is dead. Make it so (the lock file itself stays, as a kill leaves it)."""
    lock = directory / LOCK_FILE
    if lock.is_file() and lock.read_bytes():
        record = json.loads(lock.read_text())
        lock.write_text(json.dumps({**record, "pid": dead_pid()}))


def compress_cli(model: Path, out: Path, calib: Path, *extra: object, options: list[str] = CLI_OPTIONS):
    return invoke("compress", model, "-o", out, "--calib-text", calib, *options, "--quiet", *extra)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One BLAS and one torch thread, here and in the subprocesses (:data:`SINGLE_THREAD`): the same summation order
    everywhere, and no spinning thread pools on a busy 2-core machine (7x faster here)."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


class Recorder:
    """A fault hook that copies the output directory at every durable step."""

    def __init__(self, out: Path, snapshots: Path) -> None:
        self.out, self.snapshots, self.steps = out, snapshots, []

    def __call__(self, stage: str, path: Path) -> None:
        target = self.snapshots / f"{len(self.steps):03d}"
        if self.out.exists():
            shutil.copytree(self.out, target)
        else:
            target.mkdir(parents=True)
        self.steps.append((stage, str(path.relative_to(self.out)), target))


def recorded_run(root: Path, settings: dict, options: list[str]):
    """The uninterrupted reference run, with a copy of its output directory at every durable step."""
    model = Path(make_tiny_model("llama", str(root / "llama"), shards=True))
    calib = root / "calib.txt"
    calib.write_text(sample_text(seed=0))
    out = root / "reference"
    recorder = Recorder(out, root / "snapshots")
    FAULTS.hook = recorder
    try:
        report = compress_model(str(model), str(out), str(calib), CompressSettings(**settings), progress=False)
    finally:
        FAULTS.hook = None

    class Run:
        pass

    r = Run()
    r.root, r.model, r.calib, r.out, r.report, r.steps = root, model, calib, out, report, recorder.steps
    r.settings, r.options = CompressSettings(**settings), options
    r.expected = comparable(out)
    r.inputs = tree(model) | {"calib.txt": sha256(calib)}
    return r


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """SparseGPT, one stream."""
    return recorded_run(tmp_path_factory.mktemp("faults"), SETTINGS, CLI_OPTIONS)


@pytest.fixture(scope="module")
def two_stream_run(tmp_path_factory):
    """AA-SVD with block refinement: two streams, three Gram matrices per linear, low-rank shards."""
    return recorded_run(tmp_path_factory.mktemp("faults-two-streams"), TWO_STREAM_SETTINGS, TWO_STREAM_OPTIONS)


@pytest.fixture(params=["one-stream", "two-stream"])
def each_run(request):
    return request.getfixturevalue("run" if request.param == "one-stream" else "two_stream_run")


def assert_same_as_reference(run, out: Path, report: dict | None = None) -> None:
    assert comparable(out) == run.expected  # every file, byte for byte; nothing left over (locks, temporaries)
    report = report if report is not None else json.loads((out / "armor_report.json").read_text())
    assert_same_layer_results(report, run.report)
    assert verify_run(out) is not None


# ----------------------------------------------------------------------------------------------------------
# kill at every step
# ----------------------------------------------------------------------------------------------------------
def test_the_run_has_every_kind_of_step(each_run):
    run = each_run
    stages = [(stage, name) for stage, name, _ in run.steps]
    names = {name for _, name in stages}
    assert ("write", LOCK_FILE) in stages and ("remove", LOCK_FILE) == stages[-1]
    assert {"model-block-00000.safetensors", "model-lm-head.safetensors", "model-rest.safetensors"} <= names
    assert {"model.safetensors.index.json", "armor_report.json", "config.json", "tokenizer.json"} <= names
    assert any(name.startswith(".armor-progress/stream-") for name in names)
    assert sum(stage == "rename" for stage, _ in stages) >= 15 and len(stages) >= 35
    # the manifest is the first file and the last write of the run
    renames = [name for stage, name in stages if stage == "rename"]
    assert renames[0] == renames[-1] == MANIFEST_FILE


def test_a_kill_at_any_step_resumes_to_identical_files(each_run, tmp_path):
    """For every durable step: the disk as a SIGKILL at that instant leaves it is never trusted by eval/inspect/the
    loader (except after the run's last write), and ``--resume`` completes it to the uninterrupted run's bytes."""
    run = each_run
    table = []
    for k, (stage, name, snapshot) in enumerate(run.steps):
        work = tmp_path / f"{k:03d}"
        shutil.copytree(snapshot, work)
        as_if_killed(work)
        complete = k == len(run.steps) - 1  # only the lock's removal comes after the final manifest
        if complete:
            assert verify_run(work) is not None
        else:
            assert_untrusted(work)
        report = compress_model(str(run.model), str(work), str(run.calib), run.settings, resume=True, progress=False)
        assert_same_as_reference(run, work, report)
        table.append(f"{k + 1:3d}  kill before {stage:6s} {name:40s} resumed, identical")
        shutil.rmtree(work)
    print("\n".join(table))


@pytest.mark.parametrize("target", ["model-block-00000.safetensors", "index"])
def test_real_kills_leave_what_the_copies_show_and_resume(run, two_stream_run, tmp_path, target):
    """``os._exit`` in a real ``armor-ref compress`` process (``ARMOR_FAULT_INJECTION=kill:N``) just before a rename:
    exit 137, the directory holds exactly the files of the recorded copy at that step (temporary file included), and
    ``--resume`` finishes it to identical files (the block shard: in the two-stream run)."""
    run = two_stream_run if target.startswith("model-block") else run
    name = "model.safetensors.index.json" if target == "index" else target
    k = next(i for i, (stage, n, _) in enumerate(run.steps) if stage == "rename" and n == name)
    out = tmp_path / "out"
    env = {**os.environ, **SINGLE_THREAD, "ARMOR_FAULT_INJECTION": f"kill:{k + 1}"}
    cmd = [sys.executable, "-m", "toolkit", "compress", str(run.model), "-o", str(out), "--calib-text", str(run.calib)]
    proc = subprocess.run([*cmd, *run.options, "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 137, proc.stderr[-2000:]

    def shape(directory: Path) -> list[str]:  # file names, temporary files' random part masked
        return sorted(p if not p.endswith(".tmp") else p.rsplit(".", 2)[0] for p in tree(directory))

    assert shape(out) == shape(run.steps[k][2])
    assert_untrusted(out)
    result = compress_cli(run.model, out, run.calib, "--resume", options=run.options)
    assert result.exit_code == 0, result.output
    assert_same_as_reference(run, out)


# ----------------------------------------------------------------------------------------------------------
# disk full at every write
# ----------------------------------------------------------------------------------------------------------
def test_a_full_disk_at_any_write_fails_in_one_line_and_resumes(each_run, tmp_path):
    run = each_run
    writes = [(name, k) for k, (stage, name, _) in enumerate(run.steps) if stage == "write"]
    assert len(writes) >= 15
    table = []
    for n, (name, _) in enumerate(writes):
        out = tmp_path / f"{n:03d}"
        seen = []

        def full_disk(stage: str, path: Path, n=n, seen=seen) -> None:
            if stage == "write":
                seen.append(path)
                if len(seen) == n + 1:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        FAULTS.hook = full_disk
        try:
            result = compress_cli(run.model, out, run.calib, options=run.options)
        finally:
            FAULTS.hook = None
        line = assert_one_line_error(result, EXIT_FAILURE, "No space left on device")
        assert name in line  # names the file it could not write
        assert_untrusted(out)
        assert not [p for p in tree(out) if p.endswith(".tmp")]  # the failed write left nothing behind
        assert tree(run.model) | {"calib.txt": sha256(run.calib)} == run.inputs
        result = compress_cli(run.model, out, run.calib, "--resume", options=run.options)
        assert result.exit_code == 0, result.output
        assert_same_as_reference(run, out)
        table.append(f"{n + 1:3d}  ENOSPC writing {name:40s} exit 1, one line; resumed, identical")
        shutil.rmtree(out)
    print("\n".join(table))


@pytest.mark.skipif(sys.platform != "linux", reason="needs RLIMIT_FSIZE and SIGXFSZ (Linux)")
def test_a_real_refused_write_in_the_middle_of_a_shard_fails_in_one_line_and_resumes(run, tmp_path):
    """Not a hook: the kernel refuses the write (``RLIMIT_FSIZE``, EFBIG) part-way through the first block shard's
    tensor bytes (152 KB; the lock, the manifest and the stream are smaller than the 100 KB limit)."""
    import resource
    import signal

    out = tmp_path / "out"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        result = compress_cli(run.model, out, run.calib)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    line = assert_one_line_error(result, EXIT_FAILURE, "model-block-00000.safetensors (File too large)")
    assert "cannot write" in line
    assert_untrusted(out)
    assert not [p for p in tree(out) if p.endswith(".tmp")]
    result = compress_cli(run.model, out, run.calib, "--resume")
    assert result.exit_code == 0, result.output
    assert_same_as_reference(run, out)


def test_factorize_on_a_full_disk_fails_in_one_line_and_leaves_nothing(tmp_path):
    model = make_small_model(tmp_path)
    before = tree(tmp_path)

    def full_disk(stage: str, path: Path) -> None:
        if stage == "write":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    FAULTS.hook = full_disk
    try:
        result = invoke("factorize", model.weights, "--calib", model.calib, "--block-size", "16", "--sweeps", "1")
    finally:
        FAULTS.hook = None
    assert result.exit_code == EXIT_FAILURE and isinstance(result.exception, SystemExit)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]  # after the progress bars
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    assert "model.armor.safetensors (No space left on device)" in errors[0] and "Traceback" not in result.output
    assert tree(tmp_path) == before


# ----------------------------------------------------------------------------------------------------------
# concurrent runs and locks
# ----------------------------------------------------------------------------------------------------------
HOLD_LOCK = (
    "import sys; from toolkit.lock import acquire_lock; lock = acquire_lock(sys.argv[1]); print('held', flush=True)"
)


def test_a_second_run_is_refused_while_the_first_holds_the_lock(run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK + "; sys.stdin.read()", str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        result = compress_cli(run.model, out, run.calib)
        line = assert_one_line_error(result, EXIT_FAILURE, "is in use by another armor-ref run")
        assert f"pid {holder.pid} on host {socket.gethostname()}" in line
        assert sorted(os.listdir(out)) == [LOCK_FILE]  # nothing written
    finally:
        holder.communicate("")  # the holder ends: its lock is released
    result = compress_cli(run.model, out, run.calib)
    assert result.exit_code == 0, result.output
    assert_same_as_reference(run, out)


def test_the_lock_of_a_killed_run_is_taken_over(run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    killed = subprocess.run([sys.executable, "-c", HOLD_LOCK + "; import os; os._exit(137)", str(out)])
    assert killed.returncode == 137 and (out / LOCK_FILE).is_file()
    result = compress_cli(run.model, out, run.calib)
    assert result.exit_code == 0, result.output
    assert_same_as_reference(run, out)  # and the lock file is gone


def test_a_recycled_pid_does_not_keep_a_dead_lock_alive_and_another_host_is_not_judged(tmp_path):
    """A stale record naming a live pid (this process) with another start time is a recycled pid: taken over. A
    record from another host is refused, with the fix named."""
    path = tmp_path / LOCK_FILE
    with acquire_lock(tmp_path):
        record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "pid_start": "1"}))  # this pid, but not the process that took the lock
    with acquire_lock(tmp_path) as lock:
        assert lock.previous is not None and lock.previous.pid == os.getpid()
    path.write_text(json.dumps({**record, "host": "elsewhere.example"}))
    with pytest.raises(ArmorError, match="locked by a run on another host") as err:
        acquire_lock(tmp_path)
    assert err.value.exit_code == EXIT_FAILURE and f"delete {path}" in str(err.value)
    path.write_text(json.dumps(record))  # this very process, still running, lock not held: never taken over
    with pytest.raises(ArmorError, match="in use by another armor-ref run"):
        acquire_lock(tmp_path)


def test_a_second_run_started_at_any_step_of_the_first_is_refused_and_writes_nothing(run, tmp_path):
    """At every durable step of a run, a second run on its directory is started: the same command with --resume (the
    nastiest: it would pass every check but the lock) and a run with another method. Each stops with one line, exit 1
    (in use) or 2 (not empty, without --resume), and leaves the directory exactly as it found it; the first run then
    finishes to the reference bytes."""
    out = tmp_path / "out"
    outcomes = []

    def second_runs(stage: str, path: Path) -> None:
        FAULTS.hook = None  # the second runs write nothing; no recursion either way
        try:
            before = tree(out)
            same = compress_cli(run.model, out, run.calib, "--resume")
            assert_one_line_error(same, EXIT_FAILURE, "is in use by another armor-ref run")
            other = compress_cli(run.model, out, run.calib, "--method", "magnitude")
            code = EXIT_FAILURE if not (out / MANIFEST_FILE).exists() else EXIT_INPUT
            assert_one_line_error(other, code, "is in use" if code == EXIT_FAILURE else "is not empty")
            assert tree(out) == before
            outcomes.append((stage, str(path.relative_to(out))))
        finally:
            FAULTS.hook = second_runs

    FAULTS.hook = second_runs
    try:
        report = compress_model(str(run.model), str(out), str(run.calib), CompressSettings(**SETTINGS), progress=False)
    finally:
        FAULTS.hook = None
    assert outcomes == [(stage, name) for stage, name, _ in run.steps]
    assert_same_as_reference(run, out, report)


# ----------------------------------------------------------------------------------------------------------
# --resume only continues its own run, with its own settings and inputs
# ----------------------------------------------------------------------------------------------------------
class Interrupted(Exception):
    pass


def interrupted_run(run, out: Path) -> None:
    def stop(i: int) -> None:
        raise Interrupted

    with pytest.raises(Interrupted):
        compress_model(
            str(run.model), str(out), str(run.calib), CompressSettings(**SETTINGS), on_block_done=stop, progress=False
        )


def test_resume_after_the_inputs_changed_is_refused(run, tmp_path):
    model, calib, out = tmp_path / "model", tmp_path / "calib.txt", tmp_path / "out"
    shutil.copytree(run.model, model)
    shutil.copy(run.calib, calib)
    interrupted_run(run, out)  # recorded inputs: run.model's files, same bytes as the copy
    before = tree(out)
    other = Path(make_tiny_model("llama", str(tmp_path / "other"), seed=1, shards=True))
    shard = "model-00002-of-00004.safetensors"
    original = (model / shard).read_bytes()
    (model / shard).write_bytes((other / shard).read_bytes())  # other weights at the same path
    result = compress_cli(model, out, calib, "--resume")
    assert_one_line_error(result, EXIT_INPUT, f"inputs changed since the run started ({shard})")
    (model / shard).write_bytes(original)
    calib.write_text(sample_text(seed=5))
    result = compress_cli(model, out, calib, "--resume")
    assert_one_line_error(result, EXIT_INPUT, "inputs changed since the run started (the calibration text)")
    assert tree(out) == before  # refused before touching anything
    calib.write_bytes(run.calib.read_bytes())
    result = compress_cli(model, out, calib, "--resume")
    assert result.exit_code == 0, result.output
    assert_same_as_reference(run, out)


def test_resume_refuses_other_settings_and_directories_that_are_not_its_runs(run, tmp_path):
    out = tmp_path / "done"
    shutil.copytree(run.out, out)
    before = tree(out)
    result = invoke(
        "compress", run.model, "-o", out, "--calib-text", run.calib, *CLI_OPTIONS, "--method", "magnitude", "--resume"
    )
    assert_one_line_error(result, EXIT_INPUT, "settings differ from the interrupted run (method: 'sparsegpt' ->")
    result = compress_cli(run.model, out, run.calib, "--resume")  # the same settings: checked, nothing to do
    assert result.exit_code == 0 and "nothing to do" in result.stdout
    assert tree(out) == before

    user = tmp_path / "user"  # someone's own directory, with files compress would otherwise write
    user.mkdir()
    (user / "config.json").write_text('{"mine": true}')
    (user / "tokenizer.json").write_text("{}")
    before = tree(user)
    for extra in ([], ["--resume"]):
        result = compress_cli(run.model, user, run.calib, *extra)
        assert_one_line_error(result, EXIT_INPUT, "is not empty and holds no armor-ref run")
        assert tree(user) == before


# ----------------------------------------------------------------------------------------------------------
# tampering: eval, inspect and the loader check the manifest
# ----------------------------------------------------------------------------------------------------------
def _flip_a_value(out: Path) -> str:
    path = out / "model-block-00001.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.1.mlp.up_proj.armor.values"][3, 5] *= 1.5
    save_file(tensors, str(path), metadata={"format": "armor", "block_size": "16"})
    return "model-block-00001.safetensors"


def _other_valid_index_codes(out: Path) -> str:
    path = out / "model-block-00000.safetensors"
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    begin = 8 + header_len + header["model.layers.0.self_attn.q_proj.armor.index"]["data_offsets"][0]
    data[begin] = 0b1001 if data[begin] != 0b1001 else 0b0100  # positions (1, 2) or (0, 1): still valid 2:4 codes
    path.write_bytes(bytes(data))
    return "model-block-00000.safetensors"


def _truncate(out: Path) -> str:
    path = out / "model-lm-head.safetensors"
    path.write_bytes(path.read_bytes()[:-64])
    return "model-lm-head.safetensors"


def _delete_rest_shard(out: Path) -> str:
    (out / "model-rest.safetensors").unlink()
    return "model-rest.safetensors"


def _delete_manifest(out: Path) -> str:
    (out / MANIFEST_FILE).unlink()
    return "model-block-00000.safetensors"


def _mark_unfinished(out: Path) -> str:
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    (out / MANIFEST_FILE).write_text(json.dumps({**manifest, "complete": False}))
    return "model-block-00000.safetensors"


TAMPERING = {
    "edited value": (_flip_a_value, "differs from what the run wrote"),
    "other valid index codes": (_other_valid_index_codes, "differs from what the run wrote"),
    "truncated shard": (_truncate, "differs from what the run wrote"),
    "shard deleted": (_delete_rest_shard, "is missing"),
    "manifest deleted": (_delete_manifest, "holds ARMOR weights but no"),
    "manifest says unfinished": (_mark_unfinished, "unfinished compression run"),
}


def test_an_unaltered_run_is_inspected_reconstructed_and_loaded(run, tmp_path):
    result = invoke("inspect", run.out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((run.out / MANIFEST_FILE).read_text())
    assert f"all {len(manifest['outputs'])} files match the run's manifest" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if line.strip().startswith(("model.", "lm_head"))]
    assert len(rows) == 2 * 7 + 1 and all(row[2] == "ok" for row in rows)
    shard = run.out / "model-block-00001.safetensors"
    assert invoke("inspect", shard).exit_code == 0
    assert invoke("reconstruct", shard, "-o", tmp_path / "dense.safetensors").exit_code == 0
    model = load_model(str(run.out))
    assert type(model.lm_head).__name__ == "ArmorLinear"


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampered_outputs_are_refused_by_eval_inspect_reconstruct_and_the_loader(run, tmp_path, case):
    out = tmp_path / "out"
    shutil.copytree(run.out, out)
    tamper, message = TAMPERING[case]
    shard = tamper(out)
    assert_one_line_error(invoke("eval", out, "--text", run.calib, "--max-tokens", "100"), EXIT_INPUT, message)
    assert_one_line_error(invoke("inspect", out), EXIT_INPUT, message)
    if (out / shard).exists() and (out / MANIFEST_FILE).exists():  # one file of the run, checked on its own
        assert_one_line_error(invoke("inspect", out / shard), EXIT_INPUT, message)
        dense = tmp_path / "dense.safetensors"
        assert_one_line_error(invoke("reconstruct", out / shard, "-o", dense), EXIT_INPUT, message)
        assert not dense.exists()
    with pytest.raises(ArmorError, match=message):
        load_model(str(out))


# ----------------------------------------------------------------------------------------------------------
# bad input: one line, a non-zero exit, no traceback, inputs unchanged, nothing a later step would trust
# ----------------------------------------------------------------------------------------------------------
def _edit_tensor(model: Path, name: str, edit) -> None:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    path = model / index["weight_map"][name]
    tensors = load_file(str(path))
    tensors[name] = edit(tensors[name].copy())
    save_file(tensors, str(path), metadata={"format": "pt"})


def _set(value: float, where: tuple):
    def edit(array: np.ndarray) -> np.ndarray:
        array[where] = value
        return array

    return edit


def _shard_of(model: Path, name: str) -> Path:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    return model / index["weight_map"][name]


def _truncated_shard(m: Path, calib: Path) -> list:
    path = _shard_of(m, "model.layers.1.mlp.down_proj.weight")
    path.write_bytes(path.read_bytes()[:-100])
    return []


def _corrupt_header(m: Path, calib: Path) -> list:
    path = _shard_of(m, "model.layers.1.mlp.down_proj.weight")
    data = bytearray(path.read_bytes())
    data[8:12] = b"!!!!"
    path.write_bytes(bytes(data))
    return []


def _drop_from_index(m: Path, calib: Path) -> list:
    index = json.loads((m / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    (m / "model.safetensors.index.json").write_text(json.dumps(index))
    return []


def _wrong_config(m: Path, calib: Path) -> list:
    config = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    return []


def _random_calibration(m: Path, calib: Path) -> list:
    calib.write_bytes(np.random.default_rng(0).bytes(20000))
    return []


BAD_COMPRESS = {
    "truncated shard": (_truncated_shard, [], "is truncated"),
    "header-corrupted shard": (_corrupt_header, [], "is not a safetensors file"),
    "--block-size 48": (lambda m, c: [], ["--block-size", "48"], "not divisible by block size 48"),
    "NaN weight (block 1), ARMOR method": (
        lambda m, c: _edit_tensor(m, "model.layers.1.self_attn.q_proj.weight", _set(np.nan, (3, 4))) or [],
        ["--method", "armor-hessian", "--sweeps", "1"],
        "checkpoint tensor model.layers.1.self_attn.q_proj.weight holds NaN or Inf",
    ),
    "Inf embedding": (
        lambda m, c: _edit_tensor(m, "model.embed_tokens.weight", _set(np.inf, (7, 1))) or [],
        [],
        "checkpoint tensor model.embed_tokens.weight holds NaN or Inf",
    ),
    "NaN in the LM head": (
        lambda m, c: _edit_tensor(m, "lm_head.weight", _set(np.nan, (0, 0))) or [],
        [],
        "checkpoint tensor lm_head.weight holds NaN or Inf",
    ),
    "NaN in the LM head, --lm-head": (
        lambda m, c: _edit_tensor(m, "lm_head.weight", _set(np.nan, (0, 0))) or [],
        ["--lm-head"],
        "checkpoint tensor lm_head.weight holds NaN or Inf",
    ),
    "--lm-head, --block-size 48": (lambda m, c: [], ["--lm-head", "--block-size", "48"], "block size 48"),
    "tensor missing from the sharded index": (
        _drop_from_index,
        [],
        "the checkpoint lacks model.layers.1.mlp.down_proj.weight",
    ),
    "index names a missing shard": (
        lambda m, c: _shard_of(m, "model.norm.weight").unlink() or [],
        [],
        "names missing shard(s)",
    ),
    "config does not fit the weights": (_wrong_config, [], "the config expects"),
    "random bytes as calibration text": (_random_calibration, [], "is not UTF-8 text"),
    "empty calibration text": (lambda m, c: [c.write_text("  \n")] and [], [], "is empty"),
    "calibration text too short": (lambda m, c: [c.write_text("the of and")] and [], [], "need at least"),
    "--nsamples 0": (lambda m, c: [], ["--nsamples", "0"], "'--nsamples': 0 is not in the range"),
    "--sweeps -1": (lambda m, c: [], ["--sweeps", "-1"], "'--sweeps': -1 is not in the range"),
    "output is a file": (lambda m, c: ["-o", c], [], "is a file"),
    "output is the model directory": (lambda m, c: ["-o", m], [], "must differ from the model directory"),
}
NEEDS_OUTPUT_CHECK = {"NaN weight (block 1), ARMOR method"}  # found when block 1 is read: block 0 was written


@pytest.mark.parametrize("case", list(BAD_COMPRESS))
def test_compress_bad_input(run, tmp_path, case):
    prepare, extra, message = BAD_COMPRESS[case]
    model, calib, out = tmp_path / "model", tmp_path / "calib.txt", tmp_path / "out"
    shutil.copytree(run.model, model)
    shutil.copy(run.calib, calib)
    overrides = prepare(model, calib)
    before = tree(model) | {"calib.txt": sha256(calib)}
    args = ["compress", model, "-o", out, "--calib-text", calib, *BASE_OPTIONS, "--quiet", *extra, *overrides]
    assert_one_line_error(invoke(*args), EXIT_INPUT, message)
    assert tree(model) | {"calib.txt": sha256(calib)} == before
    if case in NEEDS_OUTPUT_CHECK:
        assert_untrusted(out)
    else:
        assert not out.exists()  # everything was checked before the first write


def _gram_file(m, gram: np.ndarray) -> list:
    np.savez(m.dir / "g.npz", **{"l1.weight.gram": gram})
    return ["--calib", m.dir / "g.npz", "--tensors", "l1.weight"]


BAD_FACTORIZE = {
    "--tol nan": (lambda m: ["--tol", "nan"], "'--tol': nan is not a finite number"),
    "--tol -1": (lambda m: ["--tol", "-1"], "'--tol': -1.0 is not a finite number >= 0"),
    "negative --damping": (lambda m: ["--damping", "-0.5", "--proxy", "hessian"], "'--damping': -0.5 is not"),
    "--damping inf": (lambda m: ["--damping", "inf"], "'--damping': inf is not"),
    "negated Gram": (lambda m: _gram_file(m, -(m.X.T.astype(np.float64) @ m.X)), "is not positive semi-definite"),
    "indefinite Gram": (
        lambda m: _gram_file(m, np.diag(np.r_[np.ones(127), -1.0])),
        "is not positive semi-definite",
    ),
    "all-zero calibration": (
        lambda m: np.save(m.calib, np.zeros_like(m.X)) or [],
        "is all zero (XᵀX = 0)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FACTORIZE))
def test_factorize_bad_numbers(tmp_path, case):
    model = make_small_model(tmp_path)
    make_args, message = BAD_FACTORIZE[case]
    extra = make_args(model)
    calib = [] if "--calib" in extra else ["--calib", model.calib]
    before = tree(tmp_path)
    result = invoke("factorize", model.weights, *calib, "--block-size", "16", "--sweeps", "1", *extra)
    assert_one_line_error(result, EXIT_INPUT, message)
    assert tree(tmp_path) == before  # no output, inputs unchanged


def test_eval_of_a_model_that_computes_nan_is_an_error(run, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(run.model, model)
    _edit_tensor(model, "model.layers.0.mlp.down_proj.weight", _set(np.nan, (0, 0)))
    before = tree(model)
    result = invoke("eval", model, "--text", run.calib, "--max-tokens", "100")
    line = assert_one_line_error(result, EXIT_INPUT, "perplexity of")
    assert line.split(";")[0].endswith(("is nan", "is inf")) and tree(model) == before


def test_inspect_never_says_ok_about_nan(tmp_path):
    model = make_small_model(tmp_path)
    W = model.tensors["l2.weight"].copy()
    W[0, 0] = np.nan
    save_file({**model.tensors, "l2.weight": W}, str(model.weights))
    assert_one_line_error(invoke("inspect", model.weights), EXIT_INPUT, "tensor 'l2.weight' holds NaN or Inf")
    # an ARMOR file whose passthrough bias is NaN
    (tmp_path / "clean").mkdir()
    clean = make_small_model(tmp_path / "clean")
    result = invoke("factorize", clean.weights, "--calib", clean.calib, "--block-size", "16", "--sweeps", "1")
    assert result.exit_code == 0, result.output
    armor = tmp_path / "clean" / "model.armor.safetensors"
    tensors = load_file(str(armor))
    metadata = json.loads(armor.read_bytes()[8 : 8 + int.from_bytes(armor.read_bytes()[:8], "little")])
    tensors["l1.bias"][2] = np.inf
    save_file(tensors, str(armor), metadata=metadata["__metadata__"])
    assert_one_line_error(invoke("inspect", armor), EXIT_INPUT, "tensor 'l1.bias' holds NaN or Inf")
