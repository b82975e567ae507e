"""Faults and bad input lose nothing: each test makes the fault for real."""

import gzip
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time

import numpy as np
import pytest
from etils import epath

from nin_jax import configs, errors, lineage, train
from nin_jax.data import datasets, input_pipeline
from nin_jax.run import lock, reporting, workdir
from tests.helpers import (
  ROOT,
  can_unshare_network,
  main_command,
  needs_fmnist,
  read_metrics,
  run_main,
  small_config,
  without_timing,
  write_config_file,
)
from tests.imagenet_files import write_ilsvrc_tars


def snapshot(workdir) -> dict[str, bytes]:
  """Every file under `workdir`, by relative path: to prove a refused run changed nothing."""
  files = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, workdir)] = f.read()
  return files


@pytest.mark.slow
@needs_fmnist
def test_a_rerun_that_changes_the_run_is_refused_and_changes_nothing(tmp_path, capsys):
  workdir = str(tmp_path)
  config = small_config(num_train_steps=4, schedule="cosine")
  train.train_and_evaluate(config, workdir)
  before = snapshot(workdir)
  refused = [
    dict(head="fc"),
    dict(batch_size=64),
    dict(learning_rate=0.5),
    dict(dataset="synthetic"),
    dict(seed=1),
    dict(augment="flip"),
    dict(optimizer="sgd"),
    dict(init="caffe"),
    dict(train_examples=256),
    dict(dtype="bfloat16"),
    dict(label_smoothing=0.1),
  ]
  for change in refused:
    ((key, value),) = change.items()
    with pytest.raises(
      errors.ConfigError,
      match=rf"holds a run with other settings \({key} was .*, now "
      rf"{value!r}\).*--config.allow_changes={key}\.",
    ):
      train.train_and_evaluate(small_config(num_train_steps=4, schedule="cosine", **change), workdir)
    assert snapshot(workdir) == before, change

  # Allowed on purpose, the model still cannot change: a mismatch, not "damage" to train over.
  with pytest.raises(errors.ConfigError, match="saved by another model"):
    train.train_and_evaluate(
      small_config(num_train_steps=4, schedule="cosine", head="fc", allow_changes="head"), workdir
    )
  assert snapshot(workdir) == before

  # Safe changes and a deliberate branch continue, and the workdir records which held from when.
  train.train_and_evaluate(
    small_config(
      num_train_steps=6, schedule="cosine", learning_rate=1e-3, allow_changes="learning_rate", log_every_steps=3
    ),
    workdir,
  )
  out = capsys.readouterr().out
  assert "changed from step 4: learning_rate 0.002 -> 0.001" in out
  assert "cosine learning-rate schedule now stretches" in out
  train.train_and_evaluate(small_config(num_train_steps=8, schedule="cosine", learning_rate=1e-3), workdir)
  assert json.loads((tmp_path / "config.json").read_text())["learning_rate"] == 0.002  # The first segment's.
  history = [json.loads(line) for line in (tmp_path / lineage.HISTORY_FILE).read_text().splitlines()]
  assert history == [
    {
      "from_step": 4,
      "changes": {
        "learning_rate": {"from": 0.002, "to": 0.001},
        "log_every_steps": {"from": 2, "to": 3},
        "num_train_steps": {"from": 4, "to": 6},
      },
    },
    {"from_step": 6, "changes": {"log_every_steps": {"from": 3, "to": 2}, "num_train_steps": {"from": 6, "to": 8}}},
  ]
  assert [r["step"] for r in read_metrics(workdir) if "train_loss" in r] == [2, 4, 6, 8]
  assert json.loads((tmp_path / "final.json").read_text())["step"] == 8  # The longest run's end.


@pytest.mark.parametrize(
  "change,message",
  [
    (dict(seed=-1), "seed must be a non-negative integer, got -1"),
    (dict(image_size=8), "image_size 8 cannot apply to fashion_mnist, whose images are 28x28"),
  ],
)
def test_bad_values_are_one_sentence(change, message):
  with pytest.raises(errors.ConfigError, match=message):
    configs.validate(small_config(**change), device_count=8)


@needs_fmnist
def test_a_batch_larger_than_the_training_set_is_one_sentence():
  config = small_config(train_examples=100, batch_size=128)
  with pytest.raises(
    errors.ConfigError,
    match="batch_size 128 exceeds the 100 training examples of fashion_mnist; "
    "lower --config.batch_size or raise --config.train_examples",
  ):
    input_pipeline.make_data(config, image_size=28, in_channels=1, num_classes=10, process_index=0, process_count=1)


def test_an_unknown_config_variant_is_its_own_message(tmp_path):
  proc = run_main(["--config", "experiments/nin_imagenet.py:nope", "--workdir", str(tmp_path)])
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 2
  assert err.strip() == (
    "error: bad flags or config (IllegalFlagValueError): ValueError: Unknown variant 'nope'; choose caffe or modern."
  )


@pytest.mark.slow
@needs_fmnist
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_a_non_finite_state_is_never_saved(tmp_path):
  # lr 1e300 (inf in float32): the first update overflows the parameters; step 1's loss is finite.
  config = small_config(
    optimizer="sgd", learning_rate=1e300, schedule="constant", num_train_steps=4, checkpoint_every_steps=1
  )
  with pytest.raises(errors.TrainingDiverged, match="non-finite by step 1; no checkpoint was saved yet"):
    train.train_and_evaluate(config, str(tmp_path))
  assert os.listdir(tmp_path / "checkpoints") == []


@pytest.mark.slow
@needs_fmnist
def test_a_diverged_run_lists_its_checkpoints_and_branches_from_an_earlier_one(tmp_path, capsys):
  workdir = str(tmp_path)
  base = dict(optimizer="sgd", schedule="constant", checkpoint_every_steps=2, log_every_steps=1)
  train.train_and_evaluate(small_config(learning_rate=0.02, num_train_steps=6, **base), workdir)
  with pytest.raises(
    errors.TrainingDiverged,
    match=r"at step \d+; the checkpoints are kept, at steps 2, 4, 6 "
    r".*--config.restore_step=2 .*allow_changes=learning_rate",
  ):
    train.train_and_evaluate(
      small_config(learning_rate=1e9, num_train_steps=12, allow_changes="learning_rate", **base), workdir
    )
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4", "6"]

  # Branch from step 4 at a lower rate: step 6 of the abandoned segment stays until step 6 is saved anew.
  result = train.train_and_evaluate(
    small_config(learning_rate=1e-3, num_train_steps=12, restore_step=4, allow_changes="learning_rate", **base), workdir
  )
  out = capsys.readouterr().out
  assert "branching from step 4 as asked (restore_step): the later checkpoints (steps 6) are kept" in out
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints")) == [8, 10, 12]
  assert np.isfinite(result["eval_loss"])
  history = [json.loads(line) for line in (tmp_path / lineage.HISTORY_FILE).read_text().splitlines()]
  assert history[-1] == {"from_step": 4, "branched": True, "changes": {"learning_rate": {"from": 1e9, "to": 1e-3}}}
  # The same command again resumes the branch (step 12: done), it does not branch again.
  train.train_and_evaluate(
    small_config(learning_rate=1e-3, num_train_steps=12, restore_step=4, allow_changes="learning_rate", **base), workdir
  )
  assert "nothing left to train" in capsys.readouterr().out


@pytest.mark.slow
@needs_fmnist
def test_one_writer_per_workdir(tmp_path):
  workdir = str(tmp_path / "run")
  config = small_config(num_train_steps=400, log_every_steps=5, checkpoint_every_steps=50)
  first = run_main(["--config", write_config_file(tmp_path, config), "--workdir", workdir])
  for line in first.stdout:
    if line.startswith("step 10/400"):
      break
  before = read_metrics(workdir)
  start = time.perf_counter()
  with pytest.raises(
    lock.WorkdirInUse,
    match=rf"{workdir} is in use by process {first.pid} on "
    rf"{socket.gethostname()} .*wait for it to finish or stop it",
  ):
    train.train_and_evaluate(config, workdir)
  assert time.perf_counter() - start < 5
  assert read_metrics(workdir)[: len(before)] == before

  # A crashed holder (kill -9 leaves its lock behind) does not lock the workdir forever.
  first.kill()
  first.communicate()
  assert json.loads((tmp_path / "run" / lock.LOCK_FILE).read_text())["pid"] == first.pid
  result = train.train_and_evaluate(
    small_config(num_train_steps=50, log_every_steps=5, checkpoint_every_steps=50), workdir
  )
  assert result["eval_examples"] == 300
  assert not (tmp_path / "run" / lock.LOCK_FILE).exists()  # Released at the end.


def _can_mount() -> bool:
  probe = subprocess.run(
    ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True, check=False
  )
  return probe.returncode == 0


needs_mount = pytest.mark.skipif(
  not shutil.which("unshare") or not _can_mount(),
  reason="needs root and `unshare -m` to mount a tmpfs or a read-only bind",
)


def _run_in_mount_namespace(tmp_path, mounts: str, config) -> tuple[subprocess.CompletedProcess, float]:
  """The CLI in a private mount namespace set up by `mounts` (shell), so the fault is a real one."""
  command = (
    f"{mounts} && exec {shlex.quote(sys.executable)} -m nin_jax.main --nofast_cpu_fusions "
    f"--config {shlex.quote(write_config_file(tmp_path / 'cfg', config))} --workdir {tmp_path / 'run'}"
  )
  start = time.perf_counter()
  proc = subprocess.run(
    ["unshare", "-m", "sh", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
  )
  return proc, time.perf_counter() - start


def _assert_failed_save_ends_cleanly(proc: subprocess.CompletedProcess, seconds: float, reason: str) -> None:
  assert proc.returncode == 4, proc.stderr[-3000:]
  assert seconds < 30
  assert "Traceback" not in proc.stderr
  errors_printed = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors_printed) == 1, proc.stderr[-3000:]
  assert errors_printed[0].startswith("error: Could not save the checkpoint at step 8 in ")
  assert errors_printed[0].endswith(
    f"/run/checkpoints ({reason}); the checkpoints at steps 4 are intact. Free "
    "space or make it writable, then run the same command to resume."
  )


@pytest.mark.slow
@needs_fmnist
@needs_mount
def test_a_full_disk_ends_in_one_line_and_keeps_the_checkpoints(tmp_path):
  # 7 MB hold one checkpoint of nin_mnist with Adam (4.2 MB), not two.
  (tmp_path / "run").mkdir()
  config = small_config(num_train_steps=12, checkpoint_every_steps=4, keep_checkpoints=5)
  proc, seconds = _run_in_mount_namespace(tmp_path, f"mount -t tmpfs -o size=7m tmpfs {tmp_path / 'run'}", config)
  _assert_failed_save_ends_cleanly(proc, seconds, "No space left on device")


@pytest.mark.slow
@needs_fmnist
@needs_mount
def test_a_read_only_checkpoint_directory_ends_in_one_line_and_resumes_later(tmp_path):
  config = small_config(num_train_steps=4, checkpoint_every_steps=4)
  train.train_and_evaluate(config, str(tmp_path / "run"))
  checkpoints = tmp_path / "run" / "checkpoints"
  config.num_train_steps = 12
  proc, seconds = _run_in_mount_namespace(
    tmp_path, f"mount --bind {checkpoints} {checkpoints} && mount -o remount,ro,bind {checkpoints}", config
  )
  _assert_failed_save_ends_cleanly(proc, seconds, "Read-only file system")
  assert sorted(os.listdir(checkpoints)) == ["4"]
  assert train.train_and_evaluate(config, str(tmp_path / "run"))["eval_examples"] == 300  # Writable again.
  assert sorted(os.listdir(checkpoints)) == ["12", "4", "8"]


def _idx_copy(tmp_path) -> str:
  """Debian's four Fashion-MNIST files, copied so that a test can damage one."""
  directory = tmp_path / "idx"
  shutil.copytree(datasets.DEBIAN_FASHION_MNIST, directory)
  return str(directory)


@needs_fmnist
@pytest.mark.parametrize(
  "damage,message",
  [
    (lambda data: data[: len(data) // 2], r"is damaged \(EOFError: Compressed file ended before"),
    (lambda data: b"this is not gzip at all", r"is damaged \(BadGzipFile: Not a gzipped file"),
    (lambda data: b"", r"is not an IDX file of unsigned bytes \(0 bytes\)"),
    (None, "is missing"),
  ],
)
def test_a_damaged_idx_file_is_one_line_naming_it(tmp_path, damage, message):
  directory = _idx_copy(tmp_path)
  victim = os.path.join(directory, "t10k-labels-idx1-ubyte.gz")
  if damage is None:
    os.remove(victim)
  else:
    with open(victim, "rb") as f:
      data = f.read()
    with open(victim, "wb") as f:
      f.write(damage(data))
  with pytest.raises(errors.DataError, match=re.escape(victim) + " " + message + r".*--config.idx_dir"):
    datasets.load_arrays("fashion_mnist", idx_dir=directory)


@needs_fmnist
def test_idx_dir_reads_plain_or_gzipped_files_and_the_cli_reports_damage_in_one_line(tmp_path):
  directory = _idx_copy(tmp_path)
  for name in os.listdir(directory):  # Uncompressed copies of the same data.
    path = os.path.join(directory, name)
    with gzip.open(path, "rb") as f, open(path[:-3], "wb") as out:
      out.write(f.read())
    os.remove(path)
  plain, debian = datasets.load_arrays("fashion_mnist", idx_dir=directory), datasets.load_arrays("fashion_mnist")
  np.testing.assert_array_equal(plain.train_images, debian.train_images)
  np.testing.assert_array_equal(plain.eval_labels, debian.eval_labels)

  with open(os.path.join(directory, "train-images-idx3-ubyte"), "r+b") as f:
    f.truncate(1000)
  proc = run_main(
    ["--config", "experiments/nin_fashion_mnist.py", f"--config.idx_dir={directory}", "--workdir", str(tmp_path / "w")]
  )
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 2 and "Traceback" not in err
  assert err.strip().splitlines() == [
    f"error: {directory}/train-images-idx3-ubyte is truncated (984 of 47040000 values); reinstall the data "
    "set (Debian: apt-get install --reinstall dataset-fashion-mnist) or point --config.idx_dir at a "
    "directory holding the four IDX files."
  ]


def test_a_lock_from_another_host_is_stale_only_after_its_heartbeat_stops(tmp_path):
  path = workdir.resolve(tmp_path)
  holder = {"host": "tpu-worker-7", "pid": 4242, "token": "t", "since": time.time() - 3600}
  (tmp_path / lock.LOCK_FILE).write_text(json.dumps({**holder, "heartbeat": time.time() - 10}))
  with pytest.raises(lock.WorkdirInUse, match="in use by process 4242 on tpu-worker-7 .*alive 10 s ago"):
    with lock.WorkdirLock(path):
      pass
  (tmp_path / lock.LOCK_FILE).write_text(json.dumps({**holder, "heartbeat": time.time() - lock.STALE_SECONDS - 5}))
  said = []
  with lock.WorkdirLock(path, say=said.append):
    assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["pid"] == os.getpid()
  assert said and said[0].startswith("warning: taking over the stale lock of process 4242 on tpu-worker-7")
  assert not (tmp_path / lock.LOCK_FILE).exists()


def _imagenet_config(tmp_path, **overrides):
  return small_config(
    **{
      **dict(
        dataset="imagenet2012",
        model="nin_imagenet",
        data_dir=str(tmp_path / "tfds"),
        manual_dir=str(tmp_path / "manual"),
        image_size=64,
        batch_size=8,
        eval_batch_size=8,
        train_examples=0,
        eval_examples=0,
        shuffle_buffer=16,
        preprocess="caffe_mean",
        augment="caffe",
        optimizer="sgd",
        schedule="constant",
        learning_rate=1e-3,
        log_every_steps=1,
        checkpoint_every_steps=2,
        eval_every_steps=-1,
      ),
      **overrides,
    }
  )


@pytest.mark.slow
def test_damaged_imagenet_images_are_left_out_counted_and_a_killed_run_resumes_exactly(tmp_path):
  """A non-JPEG file and a JPEG with a damaged body among the training images, and a damaged
  validation image: preparing records the two that do not decode, training leaves them out
  and counts them, and a run killed (SIGKILL) after step 3 resumes from step 2 exactly."""
  write_ilsvrc_tars(str(tmp_path / "manual"), garbage=("n01443537", 2), damaged=("n01440764", 4), damaged_val=3)
  config = _imagenet_config(tmp_path, num_train_steps=4)
  straight = train.train_and_evaluate(config, str(tmp_path / "straight"))
  with open(tmp_path / "tfds" / "imagenet2012" / "5.1.0" / "undecodable.json") as f:
    assert json.load(f) == {
      "train": ["n01440764_4.JPEG", "n01443537_2.JPEG"],
      "validation": ["ILSVRC2012_val_00000003.JPEG"],
    }
  assert straight["eval_examples"] == 7  # 8 validation images, one left out.
  logged = [r for r in read_metrics(tmp_path / "straight") if "train_loss" in r]
  # 10 decodable training images of 12: 4 steps of 8 draw 32 examples, so the two are met ~3 times each.
  assert logged[-1]["skipped_images"] >= 4

  command = main_command("--config", write_config_file(tmp_path, config), "--workdir", str(tmp_path / "resumed"))
  run = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  printed = []
  for line in run.stdout:
    printed.append(line)
    if line.startswith("step 3/4"):
      run.kill()  # SIGKILL after the line of step 3, before the checkpoint at 4.
      break
  run.wait()
  assert "1 undecodable validation image(s) left out: ILSVRC2012_val_00000003.JPEG\n" in printed, printed
  assert [r["step"] for r in read_metrics(tmp_path / "resumed") if "train_loss" in r] == [1, 2, 3]
  train.train_and_evaluate(config, str(tmp_path / "resumed"))
  resumed = [r for r in read_metrics(tmp_path / "resumed") if "train_loss" in r]
  assert without_timing(resumed) == without_timing(logged)


@pytest.mark.slow
def test_an_image_damaged_after_preparation_stops_training_with_one_line_and_verify_mends_it(tmp_path):
  """A set prepared before images were verified (no record): the damaged training image stops
  the run with one line naming it and the command that verifies the set; after that command
  the run resumes and ends, and the damaged validation image is left out of evaluation."""
  write_ilsvrc_tars(str(tmp_path / "manual"), damaged=("n01443537", 2), damaged_val=3)
  config = _imagenet_config(tmp_path, num_train_steps=3)
  from nin_jax.data import imagenet_prepare

  record = imagenet_prepare.prepared_builder(str(tmp_path / "tfds"), str(tmp_path / "manual")).data_dir
  os.remove(os.path.join(record, imagenet_prepare.RECORD))  # As a set prepared by an older version.
  proc = run_main(["--config", write_config_file(tmp_path, config), "--workdir", str(tmp_path / "run")])
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == errors.DataError.exit_code, err[-2000:]
  assert "was never verified, so a damaged image would stop training" in out
  assert err.strip().splitlines()[-1] == (
    f"error: The train image n01443537_2.JPEG in {record} does not decode (jpeg::Uncompress failed. Invalid JPEG "
    "data or crop window.): the prepared set changed since it was verified, or was never verified. Run "
    f"`python -m nin_jax.data.imagenet_prepare --verify --data_dir={tmp_path / 'tfds'}` to record the images to leave "
    "out, then run again (training resumes where it stopped)."
  )
  assert "Traceback" not in err
  assert imagenet_prepare.main(["--verify", f"--data_dir={tmp_path / 'tfds'}"]) == 0
  assert train.train_and_evaluate(config, str(tmp_path / "run"))["eval_examples"] == 7


def test_a_damaged_validation_image_found_during_evaluation_is_named(tmp_path):
  from nin_jax.data import imagenet, imagenet_prepare

  write_ilsvrc_tars(str(tmp_path / "manual"), per_synset=1, damaged_val=5)
  record = imagenet_prepare.prepared_builder(str(tmp_path / "tfds"), str(tmp_path / "manual")).data_dir
  os.remove(os.path.join(record, imagenet_prepare.RECORD))
  data = imagenet.make_data(_imagenet_config(tmp_path, eval_batch_size=2), 64, 0, 1)
  with pytest.raises(
    errors.DataError, match="^The validation image ILSVRC2012_val_00000005.JPEG in .* does not decode"
  ):
    list(data.eval_batches())


def test_a_stream_of_only_corrupt_images_stops_instead_of_spinning():
  import tensorflow as tf

  from nin_jax.data import imagenet

  jpeg = tf.io.encode_jpeg(tf.zeros((4, 4, 3), tf.uint8)).numpy()
  mixed = tf.data.Dataset.from_tensor_slices({"image": [jpeg, b"junk", jpeg, b"junk", jpeg]})
  counts = [int(skipped) for _, skipped in imagenet.without_undecodable(mixed)]
  assert counts == [0, 1, 2]  # Three images kept; the count of those skipped before each.
  junk = tf.data.Dataset.from_tensors({"image": b"junk"}).repeat()
  with pytest.raises(tf.errors.InvalidArgumentError, match=imagenet.UNDECODABLE):
    for _ in imagenet.without_undecodable(junk).take(1):
      pass


def _cut_val_tar_mid_file(manual, data_dir):
  path = manual / "ILSVRC2012_img_val.tar"
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2 + 100)  # Inside a JPEG's bytes.


def _only_the_val_tar(manual, data_dir):
  os.remove(manual / "ILSVRC2012_img_train.tar")


def _prepared_from_only_the_val_tar(manual, data_dir):
  """What `tfds build imagenet2012` makes of a manual dir that holds only the validation tar."""
  _only_the_val_tar(manual, data_dir)
  tfds = datasets.import_tfds()
  tfds.builder("imagenet2012", data_dir=str(data_dir)).download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(manual))
  )


def _damaged_synset_tar(manual, data_dir):
  """A complete outer tar whose first synset tar is garbage: only TFDS finds this one."""
  with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as tar:
    info = tarfile.TarInfo("n01440764.tar")
    info.size = 3000
    tar.addfile(info, io.BytesIO(b"\x17" * 3000))


@pytest.mark.parametrize(
  "fault,message",
  [
    (
      _cut_val_tar_mid_file,
      "error: ImageNet is not prepared and cannot be built from {manual}: "
      "ILSVRC2012_img_val.tar is truncated ({val_size:,} of image-net.org's 6,744,924,160 bytes, without the "
      "end-of-archive marker a complete tar ends with). Download the named file(s) from image-net.org into that "
      "directory (or set --config.manual_dir), then run again.",
    ),
    (
      _only_the_val_tar,
      "error: ImageNet is not prepared and cannot be built from {manual}: "
      "ILSVRC2012_img_train.tar is missing (image-net.org's file is 147,897,477,120 bytes). Download",
    ),
    (
      _prepared_from_only_the_val_tar,
      "error: The prepared imagenet2012 in {prepared} has no train split (it "
      "was built while ILSVRC2012_img_train.tar was missing from the manual directory): delete {prepared}, put "
      "both tars in the manual directory, and run again to rebuild it.",
    ),
    (
      _damaged_synset_tar,
      "error: TFDS could not build imagenet2012 from {manual}: ILSVRC2012_img_train.tar "
      "(its member n01440764.tar) is damaged (ReadError: invalid header); compare its size and SHA-256",
    ),
  ],
  ids=["val_tar_cut_mid_file", "only_the_val_tar", "prepared_from_only_the_val_tar", "damaged_synset_tar"],
)
@pytest.mark.slow
def test_imagenet_preparation_faults_name_the_file_in_one_line(tmp_path, fault, message):
  manual, data_dir = tmp_path / "manual", tmp_path / "tfds"
  write_ilsvrc_tars(str(manual), per_synset=2, num_val=4)
  fault(manual, data_dir)
  tars_before = snapshot(manual)
  proc = run_main(
    [
      "--config",
      "experiments/nin_imagenet.py",
      "--workdir",
      str(tmp_path / "run"),
      f"--config.data_dir={data_dir}",
      f"--config.manual_dir={manual}",
      "--config.image_size=64",
      "--config.batch_size=8",
      "--config.eval_batch_size=8",
    ]
  )
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
  error_lines = [line for line in err.splitlines() if "error:" in line]
  prepared = data_dir / "imagenet2012" / "5.1.0"
  expected = message.format(manual=manual, prepared=prepared, val_size=len(tars_before["ILSVRC2012_img_val.tar"]))
  assert len(error_lines) == 1 and expected in error_lines[0], err[-3000:]
  assert snapshot(manual) == tars_before  # The user's files are never touched,
  assert prepared.exists() == (fault is _prepared_from_only_the_val_tar)  # nor a prepared set deleted.


@pytest.mark.slow
@pytest.mark.skipif(not can_unshare_network(), reason="needs root and `unshare -n` for a machine without network")
def test_offline_a_missing_data_set_is_reported_within_seconds(tmp_path):
  """In a network namespace of its own nothing leaves the machine; TFDS alone retried for 3.5 minutes."""
  start = time.perf_counter()
  proc = subprocess.run(
    [
      "unshare",
      "-n",
      sys.executable,
      "-m",
      "nin_jax.main",
      "--config",
      "experiments/nin_cifar10.py",
      f"--config.data_dir={tmp_path / 'tfds'}",
      "--workdir",
      str(tmp_path / "run"),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  seconds = time.perf_counter() - start
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert seconds < 30
  assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
    f"error: TFDS 'cifar10' is not prepared in {tmp_path}/tfds/cifar10/3.0.2 and cannot be downloaded from here "
    "(www.cs.toronto.edu: [Errno -3] Temporary failure in name resolution); prepare it with `tfds build "
    "cifar10` on a machine with internet access and point --config.data_dir at its directory."
  ]


def test_hosts_of_a_multi_host_run_do_not_each_build_imagenet(tmp_path, capsys):
  from nin_jax.data import imagenet_prepare

  manual, data_dir = tmp_path / "manual", tmp_path / "tfds"
  write_ilsvrc_tars(str(manual), per_synset=2, num_val=3)
  with pytest.raises(
    errors.DataError,
    match=re.escape(
      f"2 hosts would each build it at once: prepare it once from one machine with `python -m "
      f"nin_jax.data.imagenet_prepare --data_dir={data_dir} --manual_dir={manual}`"
    ),
  ):
    imagenet_prepare.prepared_builder(str(data_dir), str(manual), process_count=2)
  assert not (data_dir / "imagenet2012" / "5.1.0").exists()
  assert imagenet_prepare.main([f"--data_dir={data_dir}", f"--manual_dir={manual}"]) == 0
  assert "4 train and 3 validation images" in capsys.readouterr().out
  assert imagenet_prepare.prepared_builder(str(data_dir), str(manual), process_count=2).is_prepared()


def test_supersede_moves_the_lines_after_a_step_and_keeps_appending(tmp_path):
  log = reporting.MetricsLog(epath.Path(tmp_path) / "metrics.jsonl")
  for step in (2, 4, 6):
    log.append({"step": step, "train_loss": float(step)})
  log.append({"step": 4, "eval_accuracy": 0.5})
  assert log.supersede_after(4) == 1 and log.supersede_after(4) == 0
  log.append({"step": 6, "train_loss": 60.0})
  log.close()
  assert [(r["step"], r.get("train_loss")) for r in read_metrics(tmp_path)] == [
    (2, 2.0),
    (4, 4.0),
    (4, None),
    (6, 60.0),
  ]
  with open(tmp_path / "metrics.superseded.jsonl") as f:
    assert [json.loads(line) for line in f] == [{"step": 6, "train_loss": 6.0}]


@pytest.mark.slow
@needs_fmnist
def test_a_run_killed_between_a_log_step_and_its_checkpoint_logs_each_step_once(tmp_path):
  """kill -9 after the lines of steps 5 and 6 are written but before the checkpoint at 8:
  the resumed run trains 5-8 again; metrics.jsonl holds each step once, and the earlier
  lines of 5 and 6 are in metrics.superseded.jsonl."""
  config = small_config(num_train_steps=12, log_every_steps=1, checkpoint_every_steps=4, eval_every_steps=-1)
  command = main_command("--config", write_config_file(tmp_path, config), "--workdir", str(tmp_path / "w"))
  env = {**os.environ, "XLA_FLAGS": ""}
  run = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for line in run.stdout:
    if line.startswith("step 6/12"):
      run.kill()  # SIGKILL: no handler runs, nothing is flushed or saved.
      break
  run.wait()
  logged = [r["step"] for r in read_metrics(tmp_path / "w") if "train_loss" in r]
  assert logged[-1] == 6
  resumed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  start = int(re.search(r"resumed from the checkpoint at step (\d+)", resumed.stdout).group(1))
  assert start == 4
  assert "moved 2 metric line(s) of steps after 4" in resumed.stdout
  steps = [r["step"] for r in read_metrics(tmp_path / "w") if "train_loss" in r]
  assert steps == list(range(1, 13))  # Each step once.
  with open(tmp_path / "w" / "metrics.superseded.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == [5, 6]


@pytest.mark.slow
@needs_fmnist
def test_a_run_whose_lock_was_taken_over_stops_without_saving(tmp_path, monkeypatch):
  """Another run takes the lock over (as it would after this run's heartbeat stalled): at its
  next heartbeat this run learns so, stops with one line and saves nothing more, and leaves
  the other run's lock in place."""
  monkeypatch.setattr(lock, "HEARTBEAT_SECONDS", 0.05)
  config = small_config(num_train_steps=5000, checkpoint_every_steps=4000, log_every_steps=4000, eval_every_steps=-1)
  workdir, failure = tmp_path / "w", []

  def run():
    try:
      train.train_and_evaluate(config, str(workdir))
    except errors.UserError as e:
      failure.append(e)

  trainer = threading.Thread(target=run)
  trainer.start()
  deadline = time.time() + 120
  while not (workdir / "lock.json").exists() and time.time() < deadline:
    time.sleep(0.05)
  time.sleep(1.0)
  other = {"host": "elsewhere", "pid": 1, "token": "the other run", "since": time.time(), "heartbeat": time.time()}
  (workdir / "lock.json").write_text(json.dumps(other))
  trainer.join(timeout=120)
  assert not trainer.is_alive() and len(failure) == 1 and isinstance(failure[0], errors.WorkdirLost)
  assert str(failure[0]).startswith("Stopped at step ") and "without saving: another run took over" in str(failure[0])
  assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")
  assert json.loads((workdir / "lock.json").read_text())["token"] == "the other run"


@pytest.mark.slow
def test_tensorflow_start_up_lines_are_silenced_for_every_entry_point():
  """`python -m nin_jax.data.imagenet_prepare` printed TensorFlow's C++ start-up lines (I0000 ...
  cpu_feature_guard.cc) before its own: the package sets TF_CPP_MIN_LOG_LEVEL first."""
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  bare = subprocess.run(
    [sys.executable, "-c", "import tensorflow"], env=env, capture_output=True, text=True, timeout=120, check=False
  )
  ours = subprocess.run(
    [sys.executable, "-c", "import nin_jax.data.imagenet_prepare"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert ours.returncode == 0, ours.stderr[-2000:]
  assert "I0000" in bare.stderr  # What TensorFlow prints on its own here (the check can fail).
  assert "I0000" not in ours.stderr and ours.stderr == "", ours.stderr[-2000:]
