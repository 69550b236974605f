"""Training under faults (issue 23): failed writes end in one line with the last checkpoint
intact, --resume skips corrupt checkpoints and checks its settings, files get the umask's
modes, a killed run's temp files are cleared, and every write is fsync'd before its rename."""

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import latentforge.io.checkpoint as checkpoint
from latentforge.errors import UserError
from latentforge.io.checkpoint import (
    remove_stale_temps,
    replace_dir_atomic,
    save_tensors_atomic,
    write_json_atomic,
)
from latentforge.training import TrainConfig, VAETrainConfig, train_diffusion
from latentforge.training.diffusion import DiffusionTrainer

ENV = {**os.environ, "LATENTFORGE_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
BASE = ["--data", "digits", "--cond", "class", "--batch-size", "4", "--warmup-steps", "1",
        "--sample-every", "0", "--quiet"]  # fmt: skip


def _cfg(out, **kw) -> TrainConfig:
    base = dict(data="digits", out=str(out), cond="class", max_steps=2, batch_size=4,
                warmup_steps=1, sample_every=0, ckpt_every=2, quiet=True)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _cli(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    """`latentforge ARGS` in a subprocess; `code` runs first (a patch) in the same process."""
    run = (
        f"{code or ''}\nimport sys\nfrom latentforge.cli import main\nsys.exit(main(sys.argv[1:]))"
    )
    cmd = [sys.executable, "-c", run, *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)


def _one_line_error(run: subprocess.CompletedProcess) -> str:
    """The single `latentforge: error:` line of a run that exited 2 without a traceback."""
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and len(lines) == 1, run.stderr[-2000:]
    assert lines[0].startswith("latentforge: error: ")
    return lines[0]


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _state(out: Path, step: int) -> dict:
    return json.loads((out / "checkpoints" / f"step-{step:07d}" / "state.json").read_text())


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    """A run with checkpoints at steps 2 and 4 (copied by each test that breaks one)."""
    out = tmp_path_factory.mktemp("two-checkpoints")
    assert train_diffusion(_cfg(out, max_steps=4)) == 0
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def _assert_resumes_from(out: Path, step: int) -> None:
    """A trainer resumes from checkpoint `step`: its weights, its step."""
    trainer = DiffusionTrainer(_cfg(out, max_steps=step + 2))
    assert trainer.resume() and trainer.step == step
    want = load_file(out / f"checkpoints/step-{step:07d}/model.safetensors")
    assert all(torch.equal(trainer.model.state_dict()[k], want[k]) for k in want)


# ----- failed writes: disk full, read-only ---------------------------------------------------
def _raise_on_state_json(real):
    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == "state.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *args, **kwargs)

    return replace


def _full_disk_save_file(tensors, filename, *args, **kwargs):
    # half a file, then what safetensors raises when the disk fills up (an io::Error in Rust)
    Path(filename).write_bytes(b"\0" * 100)
    raise SafetensorError("Error while serializing: I/O error: No space left on device "
                          "(os error 28)")  # fmt: skip


@pytest.mark.parametrize("where", ["weights", "state.json"])
def test_disk_full_while_saving_keeps_the_last_checkpoint(
    two_checkpoints, tmp_path, monkeypatch, where
):
    """ENOSPC in safetensors' writer or in the rename of state.json: one UserError naming the
    path, the cause and the checkpoint to resume from; the half-written .tmp-step folder and
    temp files are gone; the previous checkpoint still loads whole."""
    out = _copy(two_checkpoints, tmp_path)
    with monkeypatch.context() as m:
        if where == "weights":
            m.setattr(checkpoint, "save_file", _full_disk_save_file)
        else:
            m.setattr(os, "replace", _raise_on_state_json(os.replace))
        with pytest.raises(UserError) as err:
            train_diffusion(_cfg(out, max_steps=6), resume=True)
    msg = str(err.value)
    assert "no space left on device" in msg and "--resume continues from step-0000004" in msg
    name = "model.safetensors" if where == "weights" else "state.json"
    assert f"cannot write {out / 'checkpoints/.tmp-step-0000006' / name}" in msg
    assert "\n" not in msg
    assert _names(out / "checkpoints") == ["step-0000002", "step-0000004"]
    assert not [p for p in out.rglob(".*")], "temp files left behind"
    _assert_resumes_from(out, 4)


def test_disk_full_from_outside_is_one_line(two_checkpoints, tmp_path):
    """`latentforge train --resume` on a full disk: exit 2, one line naming the file and the
    cause, and the last checkpoint still resumes."""
    patch = (
        "import latentforge.io.checkpoint as c\n"
        "from safetensors import SafetensorError\n"
        "def save_file(*a, **k):\n"
        "    raise SafetensorError('I/O error: No space left on device (os error 28)')\n"
        "c.save_file = save_file\n"
    )
    out = _copy(two_checkpoints, tmp_path)
    args = ["train", "diffusion", *BASE, "--max-steps", "6", "--ckpt-every", "1", "--resume"]
    line = _one_line_error(_cli(*args, "--out", str(out), code=patch))
    where = out / "checkpoints/.tmp-step-0000005/model.safetensors"
    assert f"cannot write {where}: no space left on device" in line
    assert "--resume continues from step-0000004" in line
    assert _names(out / "checkpoints") == ["step-0000002", "step-0000004"]
    _assert_resumes_from(out, 4)


def test_read_only_file_system_in_process(two_checkpoints, tmp_path, monkeypatch):
    """EROFS when the checkpoint's temp folder is made (also what root gets on a read-only
    mount, where chmod does not bite): one line, nothing half-written."""
    out = _copy(two_checkpoints, tmp_path)
    real = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.name.startswith(".tmp-step-"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(UserError, match="read-only file system") as err:
        train_diffusion(_cfg(out, max_steps=6), resume=True)
    assert str(out / "checkpoints/.tmp-step-0000006") in str(err.value)
    assert _names(out / "checkpoints") == ["step-0000002", "step-0000004"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores chmod")
def test_read_only_out_folder_from_outside(two_checkpoints, tmp_path):
    """The out folder made read-only after the first checkpoint: the next save fails with one
    line naming the folder; made writable again, --resume goes on from that checkpoint."""
    out = _copy(two_checkpoints, tmp_path)
    folders = [out, out / "checkpoints"]
    for folder in folders:
        folder.chmod(0o555)
    try:
        args = ["train", "diffusion", *BASE, "--max-steps", "6", "--ckpt-every", "2"]
        line = _one_line_error(_cli(*args, "--out", str(out), "--resume"))
    finally:
        for folder in folders:
            folder.chmod(0o755)
    assert "permission denied" in line and str(out / "checkpoints") in line
    assert _names(out / "checkpoints") == ["step-0000002", "step-0000004"]
    assert train_diffusion(_cfg(out, max_steps=6), resume=True) == 0


# ----- corrupt or partial checkpoints ----------------------------------------------------------
def _truncate(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


BREAKS = {
    "state.json truncated": (lambda d: _truncate(d / "state.json", 40), "not valid JSON"),
    "state.json without config": (
        lambda d: (d / "state.json").write_text('{"step": 4}'), "lacks step, config"),
    "empty folder": (lambda d: [p.unlink() for p in d.iterdir()], "empty folder"),
    "weights missing": (lambda d: (d / "ema.safetensors").unlink(), "ema.safetensors is missing"),
    "weights truncated": (
        lambda d: _truncate(d / "model.safetensors"), "not a readable safetensors file"),
    "optimizer corrupt": (lambda d: _truncate(d / "optimizer.safetensors"), "not a readable"),
}  # fmt: skip


@pytest.mark.parametrize("broken", list(BREAKS))
def test_resume_skips_a_broken_newest_checkpoint(two_checkpoints, tmp_path, capsys, broken):
    """The newest checkpoint broken: one warning line names it and why, and the trainer
    resumes from step 2: model, EMA and step from there (nothing from the broken one, even
    where its model weights were intact)."""
    out = _copy(two_checkpoints, tmp_path)
    damage, why = BREAKS[broken]
    damage(out / "checkpoints/step-0000004")
    trainer = DiffusionTrainer(_cfg(out, max_steps=6))
    assert trainer.resume() and trainer.step == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"skipping {out / 'checkpoints/step-0000004'}" in lines[0]
    assert why in lines[0]
    for name, module in (("model", trainer.model), ("ema", trainer.ema)):
        want = load_file(out / "checkpoints/step-0000002" / f"{name}.safetensors")
        assert all(torch.equal(module.state_dict()[k], want[k]) for k in want), name


def test_resume_falls_back_from_outside_and_stops_when_none_is_usable(two_checkpoints, tmp_path):
    """From the command line: a broken newest checkpoint -> a warning on stderr and training
    goes on from step 2 to the end (replacing it); every checkpoint broken -> one line."""
    out = _copy(two_checkpoints, tmp_path)
    _truncate(out / "checkpoints/step-0000004/state.json", 10)
    args = ["train", "diffusion", *BASE, "--max-steps", "5", "--ckpt-every", "2", "--resume"]
    run = _cli(*args, "--out", str(out))
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "skipping" in run.stderr and "step-0000004" in run.stderr
    assert _names(out / "checkpoints") == ["step-0000004", "step-0000005"]
    assert _state(out, 4)["step"] == 4  # written again, whole

    (out / "checkpoints/step-0000004/model.safetensors").unlink()
    (out / "checkpoints/step-0000005/state.json").unlink()
    line = _one_line_error(_cli(*args, "--out", str(out)))
    assert "no usable checkpoint" in line
    assert "step-0000005 (no state.json)" in line
    assert "step-0000004 (model.safetensors is missing)" in line


def test_nothing_is_loaded_when_no_checkpoint_is_usable(two_checkpoints, tmp_path):
    out = _copy(two_checkpoints, tmp_path)
    for step in (2, 4):
        _truncate(out / f"checkpoints/step-{step:07d}/optimizer.safetensors")
    trainer = DiffusionTrainer(_cfg(out, max_steps=6))
    init = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(UserError, match="no usable checkpoint"):
        trainer.resume()
    assert trainer.step == 0
    assert all(torch.equal(init[k], v) for k, v in trainer.model.state_dict().items())


# ----- resume checks its settings --------------------------------------------------------------
def test_resume_free_settings_and_override_keys():
    from latentforge.training.loop import resume_overrides

    for cls in (TrainConfig, VAETrainConfig):
        fields = set(cls.__dataclass_fields__)
        assert fields >= cls.RESUME_FREE and "max_steps" in cls.RESUME_FREE
        assert not {"data", "seed", "batch_size", "lr", "preset"} & cls.RESUME_FREE
    cfg = _cfg("x")
    keys = resume_overrides(cfg, ["lr", "--batch-size", "grad_accum"], resume=True)
    assert keys == {"lr", "batch_size", "grad_accum"}
    with pytest.raises(UserError, match="'kl-weight': no such setting"):
        resume_overrides(cfg, ["kl-weight"], resume=True)  # a VAE setting


def test_train_diffusion_resume_lists_every_change(two_checkpoints, tmp_path):
    """Changed seed, batch size, lr and prediction: refused with one line listing all four
    (and none of the free settings); --resume-override lets them through and the next
    checkpoint records them; an unknown key, or an override without --resume, is one line."""
    out = _copy(two_checkpoints, tmp_path)
    changed = ["--seed", "1", "--batch-size", "2", "--lr", "0.002", "--prediction", "v"]
    free = ["--max-steps", "5", "--ckpt-every", "1", "--lr-schedule", "cosine"]
    args = ["train", "diffusion", *BASE, *free, "--out", str(out), "--resume"]
    line = _one_line_error(_cli(*args, *changed))
    assert f"cannot resume from {out / 'checkpoints/step-0000004'}: " in line
    for change in ["--seed was 0, now 1", "--batch-size was 4, now 2",
                   "--lr was 0.001, now 0.002", "--prediction was 'eps', now 'v'"]:  # fmt: skip
        assert change in line
    assert "max-steps" not in line and "lr-schedule" not in line and "ckpt-every" not in line
    assert "--resume-override" in line

    line = _one_line_error(_cli(*args, *changed, "--resume-override", "learning-rate"))
    assert "--resume-override 'learning-rate': no such setting" in line
    line = _one_line_error(_cli(*args[:-1], "--resume-override", "lr"))
    assert "--resume-override needs --resume" in line

    overrides = ["--resume-override", "seed", "--resume-override", "batch-size",
                 "--resume-override", "lr", "--resume-override", "prediction"]  # fmt: skip
    run = _cli(*args, *changed, *overrides)
    assert run.returncode == 0, run.stderr[-2000:]
    config = _state(out, 5)["config"]
    assert (config["seed"], config["batch_size"], config["lr"]) == (1, 2, 0.002)
    assert config["lr_schedule"] == "cosine"


def test_train_vae_resume_checks_its_settings(tmp_path):
    out = tmp_path / "vae"
    base = ["train", "vae", "--data", "digits", "--batch-size", "2", "--sample-every", "0",
            "--ckpt-every", "1", "--quiet", "--out", str(out)]  # fmt: skip
    assert _cli(*base, "--max-steps", "1").returncode == 0
    resume = [*base, "--max-steps", "2", "--resume", "--kl-weight", "0.001", "--loss", "l2"]
    line = _one_line_error(_cli(*resume))
    assert "--kl-weight was 1e-06, now 0.001; --loss was 'l1', now 'l2'" in line
    run = _cli(*resume, "--resume-override", "kl-weight", "--resume-override", "loss")
    assert run.returncode == 0, run.stderr[-2000:]
    assert _state(out, 2)["config"]["kl_weight"] == 0.001


def test_an_override_the_weights_cannot_follow_is_one_line(two_checkpoints, tmp_path):
    """--resume-override preset: the checkpoint's weights do not fit the new network, and
    resume says so (per checkpoint) instead of loading half of them."""
    out = _copy(two_checkpoints, tmp_path)
    with pytest.raises(UserError, match=r"no usable checkpoint.*weights do not match"):
        train_diffusion(_cfg(out, max_steps=6, preset="small"), True, ("preset",))


# ----- file modes ---------------------------------------------------------------------------
def _modes(folder: Path) -> set[tuple[str, str]]:
    return {("dir" if p.is_dir() else "file", oct(p.stat().st_mode & 0o777))
            for p in [folder, *folder.rglob("*")]}  # fmt: skip


def test_training_output_modes_follow_the_umask(tmp_path, monkeypatch):
    """Under umask 022 every folder a run writes is 0755 and every file 0644 (checkpoint
    weights and state, model folder, samples); under 027, writers give 0750 / 0640."""
    # the sample grid's file, not its 50-step sampling, is under test
    monkeypatch.setattr(DiffusionTrainer, "sample_images", lambda self: torch.zeros(2, 1, 8, 8))
    old = os.umask(0o022)
    try:
        assert train_diffusion(_cfg(tmp_path / "run", sample_every=2)) == 0
        assert (tmp_path / "run/samples/step-0000002.png").is_file()
        assert _modes(tmp_path / "run") == {("dir", "0o755"), ("file", "0o644")}
        os.umask(0o027)
        work = Path(tempfile.mkdtemp(dir=tmp_path))  # 0700, like an importer's
        save_tensors_atomic(work / "w.safetensors", {"a": torch.zeros(2)})
        write_json_atomic(work / "sub" / "a.json", {"a": 1})
        replace_dir_atomic(work, tmp_path / "folder")
    finally:
        os.umask(old)
    assert _modes(tmp_path / "folder") == {("dir", "0o750"), ("file", "0o640")}


# ----- leftovers of a killed run ---------------------------------------------------------------
def _leave_temps(out: Path, old: bool = True) -> list[Path]:
    ck = out / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    files = [out / ".model.safetensors.ab12cd_4", out / ".model.json.x9y8z7w6",
             out / ".tmpAbC123", ck / ".tmp-step-0000006" / "model.safetensors"]  # fmt: skip
    if old:  # step-2 exists: its .old folder is stale
        files.append(ck / ".step-0000002.old" / "state.json")
    for f in files:
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(b"half")
    return files


def test_a_killed_runs_temp_files_are_removed_on_the_next_start(two_checkpoints, tmp_path):
    """Temp files of the atomic writers, .tmp-step-N folders and .NAME.old folders are
    removed when training starts (fresh or --resume); the user's own files stay."""
    out = _copy(two_checkpoints, tmp_path)
    mine = [out / ".keep", out / "notes.txt", out / ".model.json.backup"]
    for f in [*mine, *_leave_temps(out)]:
        f.write_text("x")
    assert train_diffusion(_cfg(out, max_steps=5), resume=True) == 0
    assert _names(out / "checkpoints") == ["step-0000004", "step-0000005"]
    left = sorted(p.name for p in out.rglob(".*"))
    assert left == [".keep", ".model.json.backup"]
    assert all(f.exists() for f in mine)

    fresh = tmp_path / "fresh"
    _leave_temps(fresh, old=False)
    assert train_diffusion(_cfg(fresh)) == 0
    assert not list(fresh.rglob(".*"))


def test_an_old_folder_whose_replacement_never_arrived_is_put_back(tmp_path):
    """Killed between replace_dir_atomic's two renames: .step-N.old is all there is of step-N,
    so it is moved back, not deleted."""
    (tmp_path / ".step-0000004.old").mkdir()
    (tmp_path / ".step-0000004.old/state.json").write_text("{}")
    (tmp_path / ".x.json.abcdefgh").write_text("")
    assert remove_stale_temps(tmp_path) == [".step-0000004.old", ".x.json.abcdefgh"]
    assert _names(tmp_path) == ["step-0000004"]


# ----- fsync before rename -----------------------------------------------------------------------
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fds through /proc")
def test_checkpoint_files_are_synced_before_their_rename(tmp_path, monkeypatch):
    """Each file's data is fsync'd before os.replace makes it the file, the checkpoint folder
    before its rename, the parent after: one fsync per file plus two."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    trainer = DiffusionTrainer(_cfg(tmp_path))
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    trainer.save_checkpoint()
    ck = tmp_path / "checkpoints"
    renames = [e for e in events if e[0] == "replace"]
    for src, dst in [e[1:] for e in renames]:
        i = events.index(("replace", src, dst))
        assert ("fsync", src) in events[:i], f"{dst} renamed before its data was synced"
    i = events.index(("replace", str(ck / ".tmp-step-0000000"), str(ck / "step-0000000")))
    assert events[i + 1] == ("fsync", str(ck))
    in_checkpoint = [e for e in events[:i] if e[0] == "fsync"]
    assert len(in_checkpoint) == 4 + 1  # model, ema, optimizer, state.json; the folder
    model = [e for e in events[i:] if e[0] == "fsync"]
    assert model[-1] == ("fsync", str(tmp_path))  # the model folder's renames are synced too


def test_writers_work_where_folders_cannot_be_synced(tmp_path, monkeypatch):
    """Without O_DIRECTORY (Windows) the folder fsync is skipped; the file is still synced."""
    synced = []
    monkeypatch.delattr(os, "O_DIRECTORY", raising=False)
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    write_json_atomic(tmp_path / "a.json", {"a": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": 1} and len(synced) == 1
