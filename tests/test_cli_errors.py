"""A user's mistake or the environment's refusal is one line naming the file, key or value, with
exit code 2 and no traceback; --debug / DEBIASLAB_DEBUG=1 show the traceback instead."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY as TINY_CORE
from conftest import one_line_error, sets

from debiaslab.errors import os_error_message, user_error_message

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_CORE + ["train.steps=4", "train.log_every=2", "train.checkpoint_every=2",
                    "sample.num_samples=4", "sample.steps=3", "sample.batch_size=4",
                    "sample.samplers=[ddim]"]


# ----------------------------------------------------------------------------- config values


@pytest.mark.parametrize("override, needles", [
    ("sample.guidance=[{type: cfg, omega: .nan}]", ["sample.guidance[0].omega", "finite"]),
    ("train.lr=.inf", ["train.lr", "finite"]),
    ("train.lr=-.inf", ["train.lr", "finite"]),
    ("data.imb_factor=nan", ["data.imb_factor", "finite"]),
    ("diffusion.weighting_params={gamma: .nan}", ["diffusion.weighting_params.gamma", "finite"]),
    ("sample.options={ddim: {eta: .inf}}", ["sample.options.ddim.eta", "finite"]),
    ("train.seed=-1", ["train.seed", "-1"]),
    ("train.seed=99999999999", ["train.seed", "99999999999"]),
    ("data.seed=4294967296", ["data.seed"]),
    ("sample.seed_start=2147483600", ["sample.seed_start"]),
    ("train.device=tpu", ["train.device", "tpu"]),
    ("train.device=cuda:x", ["train.device", "cuda:x"]),
    ("model.num_res_blocks=0", ["model.num_res_blocks", "0"]),
    ("model.channel_mult=[1,0,2]", ["model.channel_mult", "[1, 0, 2]"]),
    ("model.attention_resolutions=[-8]", ["model.attention_resolutions"]),
    ("train.weight_decay=-0.1", ["train.weight_decay", "-0.1"]),
    ("name=../../x", ["name", "../../x"]),
    ("name=a/b", ["name", "a/b"]),
    ("name=.hidden", ["name", ".hidden"]),
    ("name=", ["name"]),
    ("sample.options={ddim: {etaa: 0.5}}", ["sample.options.ddim", "etaa", "eta"]),
    ("sample.options={nosuch: {eta: 0.5}}", ["sample.options.nosuch", "ddim"]),
    ("data.source_options={bogus: 1}", ["data.source_options", "bogus"]),
    ("train.resume_allow=[train.seed]", ["train.resume_allow", "train.seed", "train.lr"]),
])
def test_bad_values_fail_the_dry_run_in_one_line(capsys, override, needles):
    one_line_error(capsys, ["train", "--dry-run", "--set", override], *needles)


def test_seeds_flag_out_of_range(capsys):
    one_line_error(capsys, ["run", "--dry-run", "--seeds", "0", "-3"], "train.seed", "-3")


def test_empty_and_non_utf8_config_files(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    one_line_error(capsys, ["train", "-c", str(empty), "--dry-run"], str(empty), "empty")
    comments = tmp_path / "comments.yaml"
    comments.write_text("# nothing but a comment\n")
    one_line_error(capsys, ["train", "-c", str(comments), "--dry-run"], str(comments), "empty")
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    one_line_error(capsys, ["train", "-c", str(latin), "--dry-run"], str(latin), "UTF-8")


def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    if torch.cuda.is_available():  # the same check must pass where a GPU exists: use a bad index
        device, needle = f"cuda:{torch.cuda.device_count()}", "GPU(s) visible"
    else:
        device, needle = "cuda", "no CUDA GPU"
    one_line_error(capsys, ["train", *sets(TINY), "--set", f"output_dir={tmp_path}",
                            "--set", "tracking.enabled=false", "--set", f"train.device={device}"],
                   "train.device", needle)


# ----------------------------------------------------------------------------- the filesystem


def test_output_dir_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    line = one_line_error(capsys, ["data", "build", "--set", f"output_dir={blocker}"],
                          str(blocker))
    assert "not a folder" in line or "file" in line


def test_read_only_output_dir(tmp_path):
    """EROFS from a read-only mount when we may mount (root); EACCES from a 0555 folder
    otherwise. Either way: one line naming the path, exit 2."""
    target = tmp_path / "ro"
    target.mkdir()
    argv = [sys.executable, "-m", "debiaslab.cli", "data", "build", "--set",
            f"output_dir={target / 'out'}"]
    if os.geteuid() == 0:
        script = (f"mount -t tmpfs -o ro,size=64k tmpfs {target} && exec "
                  + " ".join(f"'{a}'" for a in argv))
        proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True,
                              text=True, cwd=ROOT)
        expected = "read-only"
    else:
        target.chmod(0o555)
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
        target.chmod(0o755)
        expected = "permission denied"
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and expected in lines[0] and str(target) in lines[0], proc.stderr


def test_disk_full_during_checkpoint_write_names_the_path(tmp_path, capsys):
    """The temp file a checkpoint goes through is /dev/full (ENOSPC on write): the user reads
    'no space left on <checkpoint>', not torch's 'unexpected pos'."""
    out = tmp_path / "out"
    ckpts = out / "runs" / "full" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / f".ckpt_00000002.pt.tmp-{os.getpid()}").symlink_to("/dev/full")
    line = one_line_error(capsys, ["train", *sets(TINY), "--set", f"output_dir={out}",
                                   "--set", "name=full", "--set", "tracking.enabled=false"],
                          "no space left on", "ckpt_00000002.pt")
    assert "unexpected pos" not in line
    assert not list(ckpts.glob("ckpt_*.pt"))  # nothing half-written was left under a real name


@pytest.mark.parametrize("code, name", [(errno.ENOSPC, "no space left on"),
                                        (errno.EROFS, "read-only"),
                                        (errno.EACCES, "permission denied"),
                                        (errno.ENOTDIR, "not a folder"),
                                        (errno.ENOENT, "no such file")])
def test_os_errors_map_to_one_line_naming_the_path(code, name):
    exc = OSError(code, os.strerror(code), "/data/x.pt")
    message = os_error_message(exc)
    assert name in message and "/data/x.pt" in message and "\n" not in message
    wrapped = RuntimeError("worker failed")  # Ray wraps a worker's error as .cause
    wrapped.cause = exc
    assert user_error_message(wrapped) == message
    assert user_error_message(KeyError("a bug")) is None  # bugs keep their traceback


# ----------------------------------------------------------------------------- MLflow stores


@pytest.mark.parametrize("uri, needles", [
    ("http://127.0.0.1:9", ["MLFLOW_TRACKING_URI", "cannot reach", "127.0.0.1:9"]),
    ("notascheme://somewhere", ["MLFLOW_TRACKING_URI", "notascheme://somewhere"]),
    ("http://", ["MLFLOW_TRACKING_URI", "no host"]),
])
def test_bad_tracking_uri_is_one_line(tmp_path, capsys, monkeypatch, uri, needles):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    one_line_error(capsys, ["train", *sets(TINY), "--set", f"output_dir={tmp_path}"], *needles)
    assert not (tmp_path / "data").exists()  # refused before any work


def test_mlflow_db_that_is_not_a_database(tmp_path, capsys):
    (tmp_path / "mlflow.db").write_bytes(b"this is not sqlite\n" * 10)
    one_line_error(capsys, ["train", *sets(TINY), "--set", f"output_dir={tmp_path}"],
                   str(tmp_path / "mlflow.db"), "not an SQLite database")
    one_line_error(capsys, ["compare", "-e", "x", "--output-dir", str(tmp_path)],
                   "mlflow.db")


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from debiaslab.config import load_config
    from debiaslab.stages import build_data, train

    out = tmp_path_factory.mktemp("ckpt")
    cfg = load_config(None, TINY + [f"output_dir={out}", "name=ck", "tracking.enabled=false"])
    build_data(cfg)
    return train(cfg, progress=False).checkpoint


def test_checkpoint_missing_keys(tmp_path, capsys):
    bad = tmp_path / "partial.pt"
    torch.save({"model": {}, "step": 3}, bad)
    one_line_error(capsys, ["sample", "--checkpoint", str(bad), "--set", f"output_dir={tmp_path}"],
                   str(bad), "'ema'", "'config'")


def test_checkpoint_with_a_malformed_shape(trained, tmp_path, capsys):
    state = torch.load(trained, weights_only=True)
    key = next(k for k, v in state["ema"]["shadow"].items() if v.ndim == 4)
    state["ema"]["shadow"][key] = torch.zeros(3, 3)
    bad = tmp_path / "shape.pt"
    torch.save(state, bad)
    one_line_error(capsys, ["sample", "--checkpoint", str(bad), "--set", f"output_dir={tmp_path}"],
                   str(bad), key.split(".")[-1])


def test_checkpoint_with_an_invalid_embedded_config_names_the_file(trained, tmp_path, capsys):
    state = torch.load(trained, weights_only=True)
    state["config"]["train"]["lr"] = "fast"
    bad = tmp_path / "config.pt"
    torch.save(state, bad)
    one_line_error(capsys, ["sample", "--checkpoint", str(bad), "--set", f"output_dir={tmp_path}"],
                   str(bad), "train.lr", "fast")


class _Payload:
    def __reduce__(self):
        return (os.system, ("true",))


def test_checkpoint_with_code_names_the_refused_global(tmp_path, capsys):
    bad = tmp_path / "evil.pt"
    torch.save({"model": {}, "step": 1, "x": _Payload()}, bad)
    line = one_line_error(capsys, ["sample", "--checkpoint", str(bad),
                                   "--set", f"output_dir={tmp_path}"],
                          str(bad), "unsupported global")
    assert "system" in line


def test_debug_flag_shows_the_traceback(tmp_path):
    bad = tmp_path / "partial.pt"
    torch.save({"model": {}, "step": 3}, bad)
    argv = [sys.executable, "-m", "debiaslab.cli", "sample", "--checkpoint", str(bad)]
    plain = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    debug = subprocess.run(argv[:3] + ["--debug"] + argv[3:], capture_output=True, text=True,
                           cwd=ROOT)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    env = {**os.environ, "DEBIASLAB_DEBUG": "1"}
    via_env = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env)
    assert "Traceback" in via_env.stderr
