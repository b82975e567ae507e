"""The prepared `imagenet2012`, built from the ILSVRC-2012 tars when needed, or one clear line.

TFDS builds imagenet2012 from two tar files in a manual directory and quietly adds a
split only for the tars it finds: with only the validation tar present it builds a data
set without a training split, which fails much later as `Unknown split 'train'`. It
reads the training tar first, for hours, so a truncated validation tar would waste them
(and a truncated training tar fails only at its end). So the tars are checked before
TFDS runs (present, complete) and a prepared set is checked before it is used (both
splits there); every failure names the file or directory and what to do.

TFDS copies the JPEG bytes without decoding them, so an image whose body is damaged (a
truncated download, bit rot) is prepared without a word and would stop training at the
same step on every resume. Preparing therefore decodes every image once, as training
does, and records the names of those that fail in `undecodable.json` beside the prepared
set (`--verify` does it again for a set that changed); the input pipeline drops those by
name before it counts positions, so resumes stay exact and cheap.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import tensorflow as tf

from nin_jax.data import datasets
from nin_jax.errors import DataError

tfds = datasets.import_tfds()

# The two tars and their sizes, from TFDS's imagenet2012 checksums.tsv (image-net.org's files).
TARS = {"train": ("ILSVRC2012_img_train.tar", 147_897_477_120), "validation": ("ILSVRC2012_img_val.tar", 6_744_924_160)}
# Images per split of ILSVRC-2012 (TFDS's imagenet2012 split sizes).
FULL_SPLITS = {"train": 1_281_167, "validation": 50_000}
TAR_BLOCK = 512  # A tar file is whole 512-byte blocks and ends with (at least) two zero blocks.
RECORD = "undecodable.json"  # Beside the prepared set's dataset_info.json.
PROGRESS_EVERY = 50_000  # Images between two progress lines of a verification.


def tar_problem(path: str, full_size: int) -> str | None:
  """Why `path` is not a complete tar file (missing, empty, cut short), or None.

  A complete tar ends with an end-of-archive marker of two zero blocks; a download cut
  anywhere lacks it, except a training tar cut exactly after one of its synset tars
  (which end in zero blocks of their own): `check_prepared` warns about that one. Reading
  the last kilobyte is instant, where listing the 148 GB training tar is not.
  """
  gfile = tf.io.gfile  # Local or gs:// paths.
  if not gfile.exists(path):
    return f"is missing (image-net.org's file is {full_size:,} bytes)"
  size = gfile.stat(path).length
  complete = size >= 2 * TAR_BLOCK and size % TAR_BLOCK == 0
  if complete:
    with gfile.GFile(path, "rb") as f:
      f.seek(size - 2 * TAR_BLOCK)
      complete = not any(f.read(2 * TAR_BLOCK))
  if not complete:
    return (
      f"is truncated ({size:,} of image-net.org's {full_size:,} bytes, without the end-of-archive "
      "marker a complete tar ends with)"
    )
  return None


def check_tars(manual_dir: str) -> None:
  """Both tars present and complete in `manual_dir`, or a DataError naming each that is not."""
  problems = []
  for name, full_size in TARS.values():
    problem = tar_problem(os.path.join(manual_dir, name), full_size)
    if problem:
      problems.append(f"{name} {problem}")
  if problems:
    raise DataError(
      f"ImageNet is not prepared and cannot be built from {manual_dir}: {' and '.join(problems)}. "
      "Download the named file(s) from image-net.org into that directory (or set "
      "--config.manual_dir), then run again."
    )


def check_prepared(builder) -> None:
  """A prepared imagenet2012 holds both splits; fewer images than ILSVRC-2012 is a warning."""
  splits = builder.info.splits
  missing = [s for s in FULL_SPLITS if s not in splits]
  if missing:
    raise DataError(
      f"The prepared imagenet2012 in {builder.data_dir} has no {' or '.join(missing)} split "
      f"(it was built while {' and '.join(TARS[s][0] for s in missing)} was missing from the "
      f"manual directory): delete {builder.data_dir}, put both tars in the manual directory, "
      "and run again to rebuild it."
    )
  short = {s: splits[s].num_examples for s, n in FULL_SPLITS.items() if splits[s].num_examples < n}
  if short:
    logging.warning(
      "The prepared imagenet2012 in %s holds fewer images than ILSVRC-2012 (%s); if it was "
      "built from incomplete tars, delete that directory and run again to rebuild it.",
      builder.data_dir,
      ", ".join(f"{s}: {n:,} of {FULL_SPLITS[s]:,}" for s, n in short.items()),
    )


def _part_being_read(error: BaseException) -> str:
  """The tar (and synset tar inside it) TFDS was reading when `error` was raised.

  Found in the locals of the traceback's frames: TFDS's own message ("invalid header",
  "reached end of file") names no file, and the user needs to know which to download.
  """
  part, tb = None, error.__traceback__
  while tb:
    for name, value in tb.tb_frame.f_locals.items():
      text = str(value) if isinstance(value, (str, os.PathLike)) else ""
      part = next((tar for tar, _ in TARS.values() if text.endswith(tar)), part)
      if name == "fname" and text.endswith(".tar"):  # TFDS's loop over the training tar's synset tars.
        part = f"{TARS['train'][0]} (its member {text})"
    tb = tb.tb_next
  return part or " or ".join(tar for tar, _ in TARS.values())


def verify_command(builder) -> str:
  """The command that (re)verifies the prepared set of `builder`."""
  return f"python -m nin_jax.data.imagenet_prepare --verify --data_dir={builder._data_dir_root}"  # pylint: disable=protected-access


def _decodes(example) -> tf.Tensor:
  """Whether the image of `example` is a JPEG that decodes as training decodes it; a damaged
  one raises. The verdict is computed from the pixels, so that tf.data cannot prune the decode."""
  image = example["image"]
  return tf.logical_and(tf.io.is_jpeg(image), tf.size(tf.io.decode_jpeg(image, channels=3)) > 0)


def _verdicts(example) -> tf.data.Dataset:
  """(file name, decodes): one element, whether the image decodes, fails, or raises."""
  decoded = tf.data.Dataset.from_tensors(example).map(lambda ex: (ex["file_name"], _decodes(ex))).ignore_errors()
  failed = tf.data.Dataset.from_tensors((example["file_name"], False))
  return decoded.concatenate(failed).take(1)


def find_undecodable(builder, split: str, say=print) -> list[str]:
  """The file names of the images in `split` that fail to decode, sorted.

  Every image is decoded once, in parallel; a failure is caught per image (ignore_errors
  on a one-element data set), so one bad file costs nothing but its line in the record.
  """
  total = builder.info.splits[split].num_examples
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
  ds = ds.interleave(_verdicts, cycle_length=16, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  undecodable, start = [], time.monotonic()
  for checked, (name, decodes) in enumerate(ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator(), 1):
    if not decodes:
      undecodable.append(name.decode())
    if checked % PROGRESS_EVERY == 0 or checked == total:
      seconds = time.monotonic() - start
      say(
        f"verified {checked:,} of {total:,} {split} images ({checked / max(seconds, 1e-9):,.0f}/s): "
        f"{len(undecodable):,} undecodable"
      )
  return sorted(undecodable)


def verify(builder, say=print) -> dict[str, list[str]]:
  """Decodes every image of the prepared set and writes the record of those that fail."""
  record = {split: find_undecodable(builder, split, say) for split in FULL_SPLITS}
  path = os.path.join(builder.data_dir, RECORD)
  partial = path + ".partial"  # Written whole, then renamed: a reader never sees half a record.
  with tf.io.gfile.GFile(partial, "w") as f:
    json.dump(record, f, indent=1)
  tf.io.gfile.rename(partial, path, overwrite=True)
  for split, names in record.items():
    if names:
      say(
        f"warning: {len(names):,} {split} image(s) cannot be decoded and will be left out: "
        f"{', '.join(names[:5])}{', ...' if len(names) > 5 else ''} (listed in {path})"
      )
  return record


def undecodable(builder) -> dict[str, list[str]] | None:
  """The record of undecodable images per split, or None if the set was never verified."""
  path = os.path.join(builder.data_dir, RECORD)
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def prepared_builder(data_dir: str, manual_dir: str, process_count: int = 1):
  """The imagenet2012 builder, prepared (from the tars in `manual_dir` if need be) and checked.

  Paths are taken as TFDS takes them, local or gs://, and never made absolute here. The
  hosts of a multi-host run would each build the whole set at once into the same place,
  for hours: there, an unprepared set is an error that says how to prepare it once.
  """
  builder = tfds.builder("imagenet2012", data_dir=data_dir or None)
  built_now = not builder.is_prepared()
  if built_now:
    manual_dir = manual_dir or os.path.join(builder._data_dir_root, "downloads", "manual")  # pylint: disable=protected-access
    check_tars(manual_dir)
    if process_count > 1:
      raise DataError(
        f"imagenet2012 is not prepared in {builder.data_dir}, and {process_count} hosts would each "
        "build it at once: prepare it once from one machine with `python -m nin_jax.data.imagenet_prepare "
        f"--data_dir={data_dir or builder._data_dir_root} --manual_dir={manual_dir}`, then run again."
      )  # pylint: disable=protected-access
    try:
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except Exception as e:  # TFDS raises OutOfRangeError, tarfile.ReadError, AssertionError, ...
      reason = (str(e).strip().splitlines() or [""])[0][:300]
      raise DataError(
        f"TFDS could not build imagenet2012 from {manual_dir}: {_part_being_read(e)} is damaged "
        f"({type(e).__name__}: {reason}); compare its size and SHA-256 with image-net.org's, "
        "download it again, and run again."
      ) from e
  check_prepared(builder)
  if built_now:
    verify(builder)  # After the check: it reads both splits.
  return builder


def main(argv=None) -> int:
  """`python -m nin_jax.data.imagenet_prepare --data_dir=DIR --manual_dir=DIR`: prepares once."""
  import argparse  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(description="Prepare TFDS imagenet2012 from the two ILSVRC-2012 tars.")
  parser.add_argument("--data_dir", default="", help="TFDS data_dir (local or gs://); default TFDS's.")
  parser.add_argument(
    "--manual_dir", default="", help="Directory of the two tars; default <data_dir>/downloads/manual."
  )
  parser.add_argument(
    "--verify",
    action="store_true",
    help="Decode every image of the prepared set again and rewrite the record of undecodable ones "
    "(for a set that changed since it was prepared or verified).",
  )
  args = parser.parse_args(argv)
  try:
    builder = prepared_builder(args.data_dir, args.manual_dir)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return e.exit_code
  record = undecodable(builder)
  if args.verify or record is None:  # A set prepared before images were verified gets its record now.
    record = verify(builder)
  splits = builder.info.splits
  print(
    f"imagenet2012 is prepared in {builder.data_dir}: "
    + " and ".join(f"{splits[s].num_examples - len(record[s]):,} {s}" for s in FULL_SPLITS)
    + " images that decode"
    + (
      f" ({sum(map(len, record.values())):,} left out, listed in {os.path.join(builder.data_dir, RECORD)})"
      if any(record.values())
      else ""
    )
    + "."
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
