"""NIN on ImageNet (ILSVRC-2012), the 4-block model of the Caffe model zoo.

Command:  python -m nin_jax.main --config experiments/nin_imagenet.py --workdir gs://BUCKET/nin_in
          python -m nin_jax.main --config experiments/nin_imagenet.py:modern --workdir ...
Hardware: a TPU slice or GPU hosts; the global batch is split over every device of every host.
Data:     TFDS `imagenet2012`, prepared from ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar
          placed in --config.manual_dir (default <data_dir>/downloads/manual); for a
          multi-host run, prepare it once first: python -m nin_jax.data.imagenet_prepare.
Recipe (":caffe", the default): SGD momentum 0.9, weight decay 5e-4, lr 0.01 at batch 64 scaled
          linearly with the global batch, x0.1 every 200k iterations, 450k iterations; at
          batch 64 over 1,281,167 images that is x0.1 at epochs 10 and 20 of 22.5, which is
          what the config says, so that any global batch keeps the Caffe schedule in epochs;
          biases 2x lr and no decay; Caffe's Gaussian init; random 224 crop of the 256x256
          image + mirror; mean subtraction.
          ":modern": 5-epoch warm-up + cosine over 40 epochs, He init, bfloat16 compute,
          Inception random-resized crops, Nesterov.
Expected: Caffe model zoo 59.36% top-1 (single centre crop) after 4-5 days on one GTX Titan
          (reported, not measured here). The modern variant has not been measured.
"""

from nin_jax.configs import default_config


def get_config(variant: str = "caffe"):
  if variant not in ("caffe", "modern"):
    raise ValueError(f"Unknown variant {variant!r}; choose caffe or modern.")
  c = default_config()
  c.dataset = "imagenet2012"
  c.model = "nin_imagenet"
  c.batch_size = 256
  c.base_batch_size = 64  # lr is given for batch 64 and scaled linearly.
  c.optimizer = "sgd"
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.eval_every_steps = 10_000
  if variant == "caffe":
    c.init = "caffe"
    c.learning_rate = 0.01
    c.num_epochs = 22.5  # ~450k iterations of 64 images (22.48 epochs).
    c.schedule = "step"
    c.decay_epochs = (10.0, 20.0)  # Every 200k iterations of 64.
    c.preprocess = "caffe_mean"
    c.augment = "caffe"
  else:
    c.init = "he"
    c.dtype = "bfloat16"
    c.learning_rate = 0.025
    c.nesterov = True
    c.num_epochs = 40.0
    c.schedule = "cosine"
    c.warmup_epochs = 5.0
    c.preprocess = "standardize"
    c.augment = "inception"
    c.label_smoothing = 0.1
  return c
