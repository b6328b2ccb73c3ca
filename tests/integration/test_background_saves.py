"""Checkpoints written in the background (2 gloo ranks): a rank killed while writing leaves the
previous checkpoint to resume from, exactly; DeepSpeed's shards written in the background are the
synchronous save's bytes; a write the filesystem refuses stops the run, naming it."""

from __future__ import annotations

import re
import resource
import subprocess

from tests.helpers import (
    DIGITS,
    QUICK,
    REPO,
    SHORT_ZERO3,
    TRAJECTORY,
    assert_resumed_exactly,
    launch,
    launch_command,
    read_metrics,
    run_env,
    run_killed_when,
)

# TRAJECTORY on resnet18: its 45 MB of weights and twice that of Adam moments take long enough to
# write that the kill below lands while rank 0 is writing (the tiny ViT's 1 MB could be published
# between the test seeing the file and its SIGKILL).
RESNET_TRAJECTORY = [*TRAJECTORY, "--model.name", "resnet18", "--model.kwargs", "{drop_rate: 0.2}"]


def test_sigkill_while_a_background_save_is_writing_resumes_from_the_previous_checkpoint(uninterrupted, tmp_path):
    """Rank 0 writes the model and optimizer and publishes; it is killed once its background write
    of step 14 has begun (the capture is over and training has moved on). The run resumes from
    step 7 and ends as if nothing had happened."""
    args = [*RESNET_TRAJECTORY, "--output-dir", str(tmp_path), "--checkpoint.every_steps", "7"]
    writing = tmp_path / "checkpoints" / ".tmp-14" / "model.safetensors"  # only the background thread writes it
    run_killed_when(args, writing, rank=0, launcher="torchrun")
    assert not (tmp_path / "checkpoints" / "14").exists()  # the kill came before the publish
    launch([*args, "--resume", "auto"], launcher="torchrun")
    assert not (tmp_path / "checkpoints" / ".tmp-14").exists()  # cleaned up by the next save
    assert_resumed_exactly(tmp_path, uninterrupted(RESNET_TRAJECTORY, launcher="torchrun"), 7)


def test_background_and_synchronous_zero3_saves_write_the_same_checkpoint(short_zero3_run, zero_configs, tmp_path):
    """DeepSpeed's shards (written through its checkpoint engine) and the EMA's, held and written
    later, byte for byte as a synchronous save writes them."""
    kwargs = dict(launcher="accelerate", accelerate_config=zero_configs["zero3"])
    launch([*SHORT_ZERO3, "--output-dir", str(tmp_path), "--checkpoint.async_save", "false"], **kwargs)
    assert {row["background"] for row in read_metrics(tmp_path, "checkpoint")} == {False}
    manifests = [(run / "checkpoints" / "2" / "manifest.json").read_text() for run in (short_zero3_run, tmp_path)]
    assert manifests[0] == manifests[1]
    assert "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt" in manifests[0]
    assert "ema-rank00001-of-00002.safetensors" in manifests[0]


def test_a_background_save_that_cannot_be_written_stops_the_run_naming_it(tmp_path):
    """A filesystem that refuses the write (here the kernel's file-size limit, as a quota or a
    full disk would): the run stops at a later step with the path and the reason."""
    limit = 4 << 20  # above every small file a run writes, below the model's 45 MB

    def file_size_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    args = ["--config", DIGITS, *QUICK, "--logging.count_flops", "false", "--output-dir", str(tmp_path)]
    args += ["--checkpoint.every_steps", "2"]
    cmd = launch_command([*args, "--loop.max_steps", "8", "--logging.every_steps", "1"], "torchrun")
    proc = subprocess.run(
        cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600, preexec_fn=file_size_limit
    )
    assert proc.returncode != 0
    folder = tmp_path / "checkpoints" / "2"
    assert re.search(
        rf"rank 0: the background save of {re.escape(str(folder))} failed \(.*File too large",
        proc.stderr,
    ), proc.stderr[-3000:]
    assert not folder.exists()
    assert max(row["step"] for row in read_metrics(tmp_path, "train")) < 8
