"""The default configuration: the paper's pretraining recipe (docs/method.md section 5).

Experiment files in `experiments/` start from `default_config()` and override fields; the
command line overrides any field as `--config.path.to.field=value`.
"""

from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
  """The paper's recipe: DINOv2-base on RealIAD, batch 32, 10 epochs, bfloat16."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.backbone = ml_collections.ConfigDict()
  c.backbone.name = "dinov2-base"
  c.backbone.weights = ""            # path to the user's .pth/.pt/.safetensors file
  c.backbone.cache_dir = ""          # converted weights cached here ("" = $ADJAX_CACHE_DIR or
                                     # ~/.cache/adjax/backbones)
  c.backbone.taps = ml_collections.FieldReference(None, field_type=tuple)  # None = the default taps
  c.image_size = 224

  c.data = ml_collections.ConfigDict()
  c.data.pretrain_format = "realiad"   # a reader of data_pipelines (realiad, mvtec, visa, ...);
                                       # one per folder when they differ (comma-separated)
  c.data.pretrain_root = ""            # a dataset folder; several (comma-separated) merge
  c.data.pretrain_classes = ""         # comma-separated "class" or "dataset/class"; "" = all
  c.data.pretrain_tfds_dir = ""        # packed ArrayRecord shards instead (several merge)
  c.data.val_format = "mvtec"          # held-out validation classes, for checkpoint selection
  c.data.val_root = ""
  c.data.val_classes = ""
  c.data.batch_size = 32
  c.data.shots = (1, 4, 8)             # n_shot drawn per batch
  c.data.max_shots = 8                 # static maximum: unused shots are masked
  c.data.anomaly_share = 0.0           # minimum share of anomalous images per batch (>= 1 image)
  c.data.augment = True
  c.data.augment_on = "auto"           # host | device (in the compiled step) | auto: device on
                                       # accelerators, host on CPU
  c.data.jpeg_draft = False            # decode JPEGs at a reduced scale (PIL draft) when they
                                       # are at least twice the resize target (faster, not the
                                       # recipe's pixels; see docs/scaling.md)
  c.data.num_workers = 0
  c.data.label_threshold_share = 32 / 196   # angle-loss token label: share of patch pixels set
  c.data.skip_unreadable_share = 0.0   # pretraining checks every image and mask first: up to
                                       # this share of unreadable records are dropped (named
                                       # in <workdir>/unreadable.json), more stop the run;
                                       # 0: any unreadable file stops it

  c.projector = ml_collections.ConfigDict()
  c.projector.num_heads = 16
  c.projector.num_ref_tokens = 2048
  c.projector.depth = 1
  c.projector.attention = "auto"     # auto | dense | dot_product | blocked | native_cpu: auto is
                                     # cuDNN's fused attention on GPUs (else dense), dense on
                                     # TPUs and several CPU devices, blocked on one CPU device;
                                     # see adjax/models/reference_attention.py

  c.loss = ml_collections.ConfigDict()
  c.loss.angle = True
  c.loss.norm = True
  c.loss.temperature = 0.15
  c.loss.center = True                 # subtract the per-level centre in the angle loss
  c.loss.residual = True               # False: raw backbone features into the projector
  c.loss.angle_block_size = 2048       # similarity block (memory cap) of the angle loss

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.weight_decay = 5e-4          # coupled L2, as torch.optim.Adam
  c.optim.epochs = 10
  c.optim.decay_epochs = (7, 9)
  c.optim.decay_factor = 0.1
  c.optim.max_steps = 0                # >0 caps the run (tests, smoke runs)

  c.train = ml_collections.ConfigDict()
  c.train.dtype = "bfloat16"           # compute dtype; parameters stay float32
  c.train.log_every = 10
  c.train.checkpoint_every = 500       # steps
  c.train.keep_checkpoints = 3
  c.train.eval_every_epochs = 1        # 0 = never
  c.train.select_on = "validation"     # or "test" to reproduce the paper's selection
  c.train.center_shots = 4
  c.train.center_images_per_group = 16   # normal images per (class, view) for the centres
  c.train.max_similarities = 1 << 25   # residual matching memory cap
  c.train.precomputed_refs = False     # True: fixed reference features per (class, view)
                                       # (`adjax refs`), reused by every step of the run
  c.train.compilation_cache = ""       # folder for JAX's persistent compilation cache; "": off

  c.eval = ml_collections.ConfigDict()
  c.eval.format = "mvtec"
  c.eval.root = ""
  c.eval.classes = ""
  c.eval.methods = ("featurenorm", "patchcore")
  c.eval.features = ("original", "pretrained")   # also "residual": residuals, no projector
  c.eval.shots = 8                     # reference images per class for the residuals
  c.eval.k_shot = 0                    # >0: few-shot training set of k normal images per class
  c.eval.noisy_share = 0.0             # share of anomalous images mixed into training
  c.eval.masks_optional = False        # keep anomalous test images without a mask (pixel
                                       # metrics then leave them out); False: a missing mask is
                                       # an error (usually a broken download). Format `folder`
                                       # always keeps them.
  c.eval.checkpoint = "auto"           # auto: the reference's rule (angle for PatchCore/PaDiM,
                                       # norm for the rest), or angle | norm for every method
  c.eval.resize = 0                    # short side before the centre crop (0: image_size)
  c.eval.class_resize = ml_collections.ConfigDict()   # per class, over eval.resize
  c.eval.aligned_references = ""       # folder of the reference's per-test-image reference
                                       # tables (<class>.json), for FeatureNorm; "" = shots
  c.eval.best_over_test = False        # CFLOW, GLASS: test every test_every epochs and report
                                       # each metric's best, as the reference's scripts do
                                       # (selection on the test set; to reproduce its tables)
  c.eval.batch_size = 16
  c.eval.tsne = True
  # Per method, e.g. {"patchcore": {"coreset_ratio": 0.1}}.
  c.eval.method_settings = ml_collections.ConfigDict()

  # `adjax fit` / adjax.Detector (docs/detector.md): a detector fitted on a folder of normal
  # images; eval.shots, eval.resize, eval.batch_size, eval.method_settings apply to it too.
  c.detect = ml_collections.ConfigDict()
  c.detect.holdout_share = 0.2         # without --val: this share of the training images,
                                       # not fitted on, sets the thresholds
  c.detect.target_fpr = 0.01           # image threshold: this share of normal images flagged
  c.detect.pixel_fpr = 0.01            # pixel threshold: this share of normal pixels flagged
  c.detect.threshold = "fpr"           # fpr | f1 (F1-optimal; needs a labelled --val)
  return c
